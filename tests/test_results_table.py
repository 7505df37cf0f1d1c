"""results.py: the paired gains and their t-intervals, which methods a pair admits, and a tiny table end to end
(its fields, its intervals recomputed by hand from its runs, and the reuse of finished runs)."""
import csv
import json
import math

import pytest

import results


def test_t_quantiles_match_the_tables():
    assert results.t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert results.t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert results.t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    # beyond the table: Student's t at 40, 60 and 120 degrees of freedom
    assert results.t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert results.t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert results.t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match='at least 1 degree of freedom'):
        results.t_quantile_975(0)


def test_paired_gain_is_the_hand_worked_t_interval():
    # gains 2, 2, 1, 1, 4: mean 2, sample std sqrt(6 / 4), half-width 2.7764 * sqrt(1.5) / sqrt(5) = 1.5207
    mean, low, high = results.paired_gain([80, 82, 81, 79, 83], [78, 80, 80, 78, 79])
    assert mean == pytest.approx(2.0)
    assert (low, high) == (pytest.approx(0.4793, abs=1e-4), pytest.approx(3.5207, abs=1e-4))
    # pairing removes what the seeds share: the same tops unpaired would give a far wider interval
    assert results.paired_gain([70, 90], [69, 89]) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    assert results.paired_gain([81.5], [80.0]) == (pytest.approx(1.5), None, None)
    assert results.paired_gain([], []) == (None, None, None)


def test_a_method_runs_where_its_constructor_admits_the_pair():
    argv = ['--dataset', 'synthetic', '--synthetic-classes', '4', '--img-size', '32']
    assert results.admission('kd', 'test_resnet', 'test_efficientnet', argv) is None
    assert results.admission('uskd', None, 'test_efficientnet', argv) is None
    why = results.admission('vitkd', 'test_resnet', 'test_efficientnet', argv)
    assert 'plain token model' in why


def test_bad_pair_and_method_names_are_usage_errors(capsys):
    assert results.main(['--pairs', 'nope']) == 2
    assert "unknown pair 'nope'" in capsys.readouterr().err
    assert results.main(['--methods', 'kdd']) == 2
    assert "unknown method 'kdd'" in capsys.readouterr().err


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_quick_table_is_paired_and_reuses_finished_runs(tmp_path, capsys):
    tiny = ['--quick', '--pair', 'tiny', 'test_resnet', 'test_efficientnet', '--pairs', 'tiny', '--epochs', '2',
            '--teacher-epochs', '1', '--output', str(tmp_path), '--train-args',
            '--synthetic-classes 4 --synthetic-superclasses 2 --synthetic-train-size 64 --synthetic-val-size 32 '
            '--batch-size 16 --lr 0.01']
    assert results.main([*tiny, '--methods', 'kd']) == 0
    first = {(r['method'], r['seed']): r for r in read_csv(tmp_path / 'runs.csv')}
    assert set(first) == {('teacher', '0'), ('vanilla', '0'), ('vanilla', '1'), ('kd', '0'), ('kd', '1')}
    assert all(r['status'] == 'ok' and r['exit_code'] == '0' for r in first.values())
    # every run reports its top-1 after each epoch; the last one is its result
    for r in first.values():
        curve = [float(t) for t in r['top1_per_epoch'].split()]
        assert len(curve) == (1 if r['method'] == 'teacher' else 2) and curve[-1] == float(r['top1'])

    # extend the table by one method (and one the pair does not admit), and by kd from a teacher cache written
    # once per seed: only the new runs train
    assert results.main([*tiny, '--methods', 'kd', 'dkd', 'vitkd', 'kd@cache']) == 0
    runs = {(r['method'], r['seed']): r for r in read_csv(tmp_path / 'runs.csv')}
    for key, run in first.items():
        assert runs[key]['status'] == 'ok (reused)' and runs[key]['run_dir'] == run['run_dir']
    assert runs[('dkd', '0')]['status'] == runs[('dkd', '1')]['status'] == 'ok'
    # each seed's cache is of that seed's data stream: train.py refuses (exit 2) a cache of another data seed
    for seed in '01':
        assert runs[('cache', seed)]['status'] == runs[('kd@cache', seed)]['status'] == 'ok'
        cache = runs[('cache', seed)]['run_dir']
        with open(f'{cache}/manifest.json') as f:
            assert json.load(f)['stream']['data_seed'] == int(seed)
        with open(runs[('kd@cache', seed)]['run_dir'] + '/args.yaml') as f:
            assert f'teacher_cache: {cache}' in f.read()
    rows = {r['method']: r for r in read_csv(tmp_path / 'results.csv')}
    assert set(rows) == {'teacher', 'vanilla', 'kd', 'dkd', 'vitkd', 'kd@cache', 'kd@cache vs kd'}
    versus = [float(runs[('kd@cache', s)]['top1']) - float(runs[('kd', s)]['top1']) for s in '01']
    assert float(rows['kd@cache vs kd']['gain_mean']) == pytest.approx(sum(versus) / 2, abs=0.006)
    assert rows['kd@cache vs kd']['status'].startswith('gain over kd from the live teacher')
    assert list(rows['kd']) == ['method', 'pair', 'teacher', 'student', 'seeds', 'top1_mean', 'gain_mean',
                                'gain_ci_low', 'gain_ci_high', 'ci_half_width', 'status']
    assert rows['vitkd']['status'].startswith('not admitted: vitkd:') and rows['vitkd']['seeds'] == '0'
    for method in ('kd', 'dkd'):
        row = rows[method]
        top1 = [float(runs[(method, s)]['top1']) for s in '01']
        alone = [float(runs[('vanilla', s)]['top1']) for s in '01']
        gains = [a - b for a, b in zip(top1, alone)]
        half = 12.7062 * abs(gains[0] - gains[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * s / sqrt(n)
        mean = sum(gains) / 2
        assert (row['pair'], row['teacher'], row['student'], row['seeds']) == (
            'tiny', 'test_resnet', 'test_efficientnet', '2')
        assert float(row['top1_mean']) == pytest.approx(sum(top1) / 2, abs=0.006)
        assert float(row['gain_mean']) == pytest.approx(mean, abs=0.006)
        assert float(row['gain_ci_low']) == pytest.approx(mean - half, abs=0.006)
        assert float(row['gain_ci_high']) == pytest.approx(mean + half, abs=0.006)
    with open(tmp_path / 'results.json') as f:
        assert len(json.load(f)) == 7
    assert (tmp_path / 'gains.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    text = (tmp_path / 'results.md').read_text()
    assert '95% CI of the gain' in text and 'top-1 per epoch' in text
