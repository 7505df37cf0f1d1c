from . import cifar  # registers the CIFAR models
from .features import FeatureAdapter, FeatureRequest, Features, ModelDescription, TapInfo, to_map, to_tokens
