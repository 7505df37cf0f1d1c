"""The dispatch table from --distiller NAME to its class. One file per method."""
from .base import Distiller, DistillerError, float32_loss, hard_targets
from .bkd import BKD
from .correlation import Correlation
from .crd import CRD
from .ctkd import CTKD
from .dist import DIST
from .dkd import DKD
from .fitnet import FitNet
from .kd import KD, kd_loss
from .mgd import MGD
from .mlkd import MLKD
from .nkd import NKD
from .ofa import OFA
from .rkd import RKD
from .scalekd import ScaleKD
from .srrl import SRRL
from .ufd import UFD
from .uskd import USKD
from .vanilla import Vanilla
from .vitkd import ViTKD, ViTKDNKD
from .wsld import WSLD

# Order is the README's: the headline method first, then logit, self-KD, feature and heterogeneous methods.
DISTILLERS = {
    'ufd': UFD,
    'vanilla': Vanilla,
    'kd': KD,
    'dkd': DKD,
    'wsld': WSLD,
    'nkd': NKD,
    'uskd': USKD,
    'dist': DIST,
    'bkd': BKD,
    'ctkd': CTKD,
    'mlkd': MLKD,
    'fitnet': FitNet,
    'mgd': MGD,
    'srrl': SRRL,
    'crd': CRD,
    'rkd': RKD,
    'correlation': Correlation,
    'vitkd': ViTKD,
    'vitkd_nkd': ViTKDNKD,
    'ofa': OFA,
    'scalekd': ScaleKD,
}


def get_distiller_class(name: str):
    try:
        return DISTILLERS[name.lower()]
    except KeyError:
        raise DistillerError(
            f'unknown distiller {name!r}; choose one of: {", ".join(sorted(DISTILLERS))}') from None


def add_distiller_args(parser):
    """Every method's namespaced flags, so that any config or command line can name them."""
    for cls in dict.fromkeys(DISTILLERS.values()):
        cls.add_args(parser)
