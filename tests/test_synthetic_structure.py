"""The synthetic dataset's structure options: superclasses of related classes (--synthetic-superclasses) and a
class-balanced training subset (--synthetic-train-fraction); the defaults give the images they always gave."""
import sys

import pytest
import torch

import train
import validate
from data import DatasetError, create_datasets, create_eval_dataset
from data.synthetic import SyntheticImageDataset
from tests.helpers import SYNTHETIC_ARGS

# the first training image of SyntheticImageDataset(num_classes=3, num_samples=64, img_size=8, seed=0) as the
# generator drew it before the structure options existed (8 x 8 x 3 bytes, row-major HWC)
FIRST_IMAGE_HEX = (
    '82834364a0e18d99bf84c85fa381417085478c505b7f6a61788f8e5d6963975eb097856a81594f59a79e54bf8d97b5c6a4aa9b90992'
    '28a4e7db7919292966d8d7a625389825c78c1939dbc557c407d97796f4e66369271c299c885b1b05c7070bb59649a958a8dc07e9aa9'
    'c4488b8c6582b06e79857a284f637b42885c6f525a5469819e3c9679639c7dc2bebb716b465c864f6083b8779e7994b3cf617cd64f6'
    '324767b44a373618391a15d6ee38d857e7e5e57ae64bd896e7ee49a4ab3ac86')


def class_distances(dataset):
    """Distances between the classes' translation-invariant descriptors: the amplitude spectrum of each class's
    noiseless textures (a circular shift changes only phases), averaged over its modes, unit-normalized."""
    amplitude = torch.fft.fft2(dataset.class_textures()).abs().mean(1).flatten(1)
    amplitude = amplitude / amplitude.norm(dim=1, keepdim=True)
    return torch.cdist(amplitude, amplitude)


def test_defaults_give_the_images_they_always_gave():
    first = SyntheticImageDataset(num_classes=3, num_samples=64, img_size=8, seed=0)
    assert first.images[0].tobytes().hex() == FIRST_IMAGE_HEX
    assert first.targets[:10] == [1, 0, 1, 1, 2, 2, 1, 0, 0, 0]
    train_set = SyntheticImageDataset(num_classes=10, num_samples=64, img_size=32, split='train', seed=3)
    val_set = SyntheticImageDataset(num_classes=10, num_samples=64, img_size=32, split='val', seed=3)
    assert train_set.targets[:8] == [9, 3, 9, 6, 2, 4, 4, 1]
    assert val_set.targets[:8] == [2, 4, 9, 2, 8, 4, 6, 3]
    explicit = SyntheticImageDataset(num_classes=10, num_samples=64, img_size=32, split='train', seed=3,
                                     superclasses=0, fraction=1.0)
    assert (explicit.images == train_set.images).all()


def test_superclass_prototypes_are_closer_within_than_across():
    group = SyntheticImageDataset.superclass_of(20, 4)
    assert group.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    within = (group[:, None] == group[None]) & ~torch.eye(20, dtype=torch.bool)
    across = group[:, None] != group[None]
    structured = class_distances(SyntheticImageDataset(num_classes=20, num_samples=40, img_size=32,
                                                       superclasses=4))
    # every class is nearer to each class of its superclass than to any class of another one
    assert structured[within].max() < structured[across].min()
    assert structured[within].mean() < 0.7 * structured[across].mean()
    # without superclasses the same grouping means nothing
    flat = class_distances(SyntheticImageDataset(num_classes=20, num_samples=40, img_size=32))
    assert flat[within].mean() > 0.9 * flat[across].mean()


def test_superclasses_keep_the_samples_and_change_only_the_classes():
    plain = SyntheticImageDataset(num_classes=6, num_samples=48, img_size=16, superclasses=0)
    grouped = SyntheticImageDataset(num_classes=6, num_samples=48, img_size=16, superclasses=2)
    # the same labels and draws, other textures
    assert plain.targets == grouped.targets and not (plain.images == grouped.images).all()
    freq, phase, _ = grouped.modes
    assert torch.equal(freq[0, :, :2], freq[2, :, :2]) and torch.equal(phase[3, :, :2], phase[5, :, :2])
    assert not torch.equal(freq[0, :, :2], freq[3, :, :2])


def test_train_fraction_is_a_deterministic_balanced_subset_of_the_full_set():
    full = SyntheticImageDataset(num_classes=7, num_samples=100, img_size=8, seed=2)
    half = SyntheticImageDataset(num_classes=7, num_samples=100, img_size=8, seed=2, fraction=0.5)
    again = SyntheticImageDataset(num_classes=7, num_samples=100, img_size=8, seed=2, fraction=0.5)
    fifth = SyntheticImageDataset(num_classes=7, num_samples=100, img_size=8, seed=2, fraction=0.2)
    assert len(half) == 50 and len(fifth) == 20
    assert (half.images == again.images).all() and half.targets == again.targets
    counts = torch.bincount(torch.tensor(half.targets), minlength=7)
    assert counts.max() - counts.min() <= 1
    keep = SyntheticImageDataset.balanced_subset(full.targets, 50)
    assert (half.images == full.images[keep.numpy()]).all() and half.targets == [full.targets[i] for i in keep]
    # a smaller subset is part of a larger one
    assert set(SyntheticImageDataset.balanced_subset(full.targets, 20).tolist()) <= set(keep.tolist())
    assert SyntheticImageDataset.balanced_subset([0, 1, 1, 1, 0, 2], 4).tolist() == [0, 1, 2, 5]


def test_train_flags_reach_the_dataset_and_validation_keeps_the_whole_val_split():
    args = train.parse_args([*SYNTHETIC_ARGS, '--synthetic-superclasses', '5', '--synthetic-train-fraction',
                             '0.25'])[0]
    assert (args.synthetic_superclasses, args.synthetic_train_fraction) == (5, 0.25)
    args.input_size = (3, 32, 32)
    train_set, val_set, classes = create_datasets(args)
    assert (len(train_set), len(val_set), classes) == (32, 64, 10)
    assert train_set.superclasses == val_set.superclasses == 5
    defaults = train.parse_args(list(SYNTHETIC_ARGS))[0]
    assert (defaults.synthetic_superclasses, defaults.synthetic_train_fraction) == (0, 1.0)


@pytest.mark.parametrize('flag, value, message', [
    ('--synthetic-superclasses', '11', '--synthetic-superclasses 11 exceeds the 10 classes'),
    ('--synthetic-train-fraction', '0.001', '--synthetic-train-fraction 0.001 keeps none of the 128'),
])
def test_bad_structure_values_name_themselves(flag, value, message, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, 'argv', ['train.py', *SYNTHETIC_ARGS, flag, value, '--output', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and message in err and 'Traceback' not in err


@pytest.mark.parametrize('value', ['0', '1.5', '-0.2'])
def test_train_fraction_outside_its_range_is_refused_at_parse_time(value, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, 'argv', ['train.py', *SYNTHETIC_ARGS, '--synthetic-train-fraction', value,
                                      '--output', str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    assert exit_info.value.code == 2 and '--synthetic-train-fraction' in capfd.readouterr().err


def test_validate_recovers_superclasses_and_fraction_from_the_checkpoint(tmp_path, monkeypatch):
    import timm
    model = timm.create_model('test_resnet', num_classes=4)
    run_args = dict(dataset='synthetic', synthetic_classes=4, synthetic_train_size=40, synthetic_val_size=12,
                    synthetic_seed=1, synthetic_superclasses=2, synthetic_train_fraction=0.5)
    path = tmp_path / 'last.pth.tar'
    torch.save(dict(arch='test_resnet', num_classes=4, state_dict=model.state_dict(), args=run_args,
                    data_config=dict(input_size=(3, 32, 32))), path)
    made = []

    def recording(*a):
        made.append(create_eval_dataset(*a))
        return made[-1]

    monkeypatch.setattr(validate, 'create_eval_dataset', recording)
    train_row, = validate.main(['--checkpoint', str(path), '--workers', '0', '--split', 'train'])
    val_row, = validate.main(['--checkpoint', str(path), '--workers', '0'])
    assert (train_row['images'], val_row['images']) == (20, 12)
    expected = SyntheticImageDataset(num_classes=4, num_samples=40, img_size=32, seed=1, superclasses=2,
                                     fraction=0.5)
    assert (made[0].images == expected.images).all() and made[1].superclasses == 2
    with pytest.raises(DatasetError, match='--synthetic-superclasses 5 exceeds the 4 classes'):
        create_eval_dataset('synthetic', None, 'val', 32, 4, 12, 1, 5)


def test_dataset_refuses_bad_structure_arguments():
    with pytest.raises(ValueError, match='superclasses must be 0'):
        SyntheticImageDataset(num_classes=4, num_samples=8, superclasses=5)
    with pytest.raises(ValueError, match='fraction must be in'):
        SyntheticImageDataset(num_classes=4, num_samples=8, fraction=0.01)
    with pytest.raises(ValueError, match='at least 2 waves'):
        SyntheticImageDataset(num_classes=4, num_samples=8, superclasses=2, waves_per_mode=1)
