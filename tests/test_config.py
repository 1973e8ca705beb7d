import argparse
import dataclasses

import pytest
from conftest import run_job

from pipeline import config
from pipeline.config import ConfigError, TrainConfig


def _parse(*argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(list(argv)))


def test_unknown_keys_fail_and_name_the_key():
    with pytest.raises(ConfigError, match="unknown config keys \\['batchsize'\\]"):
        TrainConfig.from_dict({"batchsize": 3})


def test_unknown_profile_fails_and_lists_the_profiles():
    with pytest.raises(ConfigError, match="unknown profile 'cifar'.*imagenet.*sample"):
        config.resolve("cifar")


def test_imagenet_profile_is_the_paper_recipe():
    cfg = config.resolve("imagenet")
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.crop) == (
        128,
        0.01,
        0.9,
        5e-4,
        90,
        224,
    )


def test_imagenet_profile_divides_the_lr_on_plateaus_at_most_three_times():
    cfg = config.resolve("imagenet")
    assert (cfg.schedule, cfg.lr_drops, cfg.normalize) == ("plateau", 3, "mean-std")
    assert config.resolve("imagenet", schedule="step").step_epochs == 30


def test_lr_scales_linearly_with_the_global_batch():
    assert config.resolve("imagenet", workers=8, batch_size=128).scaled_lr == pytest.approx(0.08)
    assert config.resolve("imagenet", workers=1, batch_size=64).scaled_lr == pytest.approx(0.005)


def test_flags_are_generated_from_fields_and_override_the_profile():
    cfg = _parse("--profile", "sample", "--epochs", "3", "--lrn", "--init", "paper", "--batch-size", "16")
    assert (cfg.profile, cfg.epochs, cfg.lrn, cfg.init, cfg.batch_size) == ("sample", 3, True, "paper", 16)
    assert cfg.crop == config.PROFILES["sample"]["crop"]  # untouched fields keep the profile's value
    assert _parse("--no-lrn").lrn is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"crop": 32}, "at least 63"),
        ({"init": "he"}, "init must be one of"),
        ({"decode_on": "gpu"}, "decode_on must be one of \\('data', 'train'\\), got 'gpu'"),
        ({"workers": 0}, "workers"),
        ({"workers": 2, "min_workers": 3}, "--workers MIN:MAX needs 1 <= MIN <= MAX, got 3:2"),
        ({"schedule": "cosine"}, "schedule must be one of \\('plateau', 'step', 'constant'\\)"),
        ({"normalize": "zca"}, "normalize must be one of \\('mean-std', 'mean-image'\\)"),
        ({"lr_drops": -1}, "lr_drops must be >= 0"),
        ({"checkpoint_every_steps": -5}, "checkpoint_every_steps must be >= 0"),
        ({"stall_warning": -1}, "stall_warning must be >= 0"),
        ({"name": "../escaped"}, "name '../escaped' is not a plain name"),
        ({"name": "."}, "name '.' is not a plain name"),
        ({"name": "runs/a"}, "name 'runs/a' is not a plain name"),
        ({"resume": ".."}, "resume '..' is not a plain name"),
    ],
)
def test_bad_values_fail_with_a_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve("sample", **overrides)


def test_run_names_are_plain_names():
    for name in ("alexnet-sample-20261130-061500", "exp_1.2", "A"):
        assert config.resolve("sample", name=name).name == name


def test_the_train_job_rejects_unknown_flags_and_bad_values_without_starting_ray():
    for argv, message in (
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--crop", "10"], "at least 63"),
        (["--decode-on", "cpu"], "argument --decode-on: invalid choice: 'cpu' (choose from 'data', 'train')"),
    ):
        proc = run_job("jobs/train.py", *argv)
        assert proc.returncode == 2
        assert message in proc.stderr
        assert "Ray" not in proc.stdout + proc.stderr


def test_every_flag_says_what_it_is_for():
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest in {f.name for f in dataclasses.fields(TrainConfig)}}
    assert (
        helps["fc_width"].startswith("width of fc6 and fc7 (the paper: 4096)") and "imagenet: 4096" in helps["fc_width"]
    )
    assert len(helps) == len(dataclasses.fields(TrainConfig)) - 1  # min_workers: --workers MIN:MAX
    assert "MIN:MAX" in helps["workers"]


def test_workers_min_max_trains_elastically_and_n_stays_fixed():
    cfg = _parse("--profile", "imagenet", "--workers", "2:8")
    assert (cfg.min_workers, cfg.workers, cfg.elastic, cfg.worker_count) == (2, 8, True, (2, 8))
    assert cfg.global_batch == 1024 and cfg.workers_shown == "2..8 workers (elastic)"
    fixed = _parse("--workers", "4")
    assert (fixed.min_workers, fixed.workers, fixed.elastic, fixed.worker_count) == (0, 4, False, 4)
    assert _parse("--workers", "3:3").worker_count == 3  # MIN = MAX: fixed
    for bad in ("0:4", "4:2", "two", "1:", "0"):
        with pytest.raises(SystemExit):
            _parse("--workers", bad)


def test_every_world_size_keeps_the_global_batch_or_takes_the_nearest_with_its_lr():
    cfg = config.resolve("imagenet", workers=8, min_workers=1)  # batch 128 per worker, global 1024, lr 0.08
    expected = {8: (1, 1024), 4: (2, 1024), 2: (4, 1024), 1: (8, 1024), 3: (3, 1152), 5: (2, 1280), 6: (1, 768),
                7: (1, 896)}  # fmt: skip
    for world, (micro_batches, batch) in expected.items():
        assert (cfg.accumulation(world), cfg.global_batch_at(world)) == (micro_batches, batch), world
        assert cfg.lr_at(world) == pytest.approx(0.01 * batch / 128), world
    for most in range(1, 17):
        cfg = config.resolve("sample", workers=most, min_workers=1, batch_size=32)
        for world in range(1, most + 1):
            k = cfg.accumulation(world)
            assert abs(world * k - most) == min(abs(world * j - most) for j in range(1, most + 2)), (most, world)
            if most % world == 0:  # whenever it can be exact, it is, and so is the lr
                assert (cfg.global_batch_at(world), cfg.lr_at(world)) == (cfg.global_batch, cfg.scaled_lr)
    assert config.resolve("sample", workers=3, min_workers=1).accumulation(2) == 2  # 4 or 2 for 3: the larger
    with pytest.raises(ValueError, match="world size 9 is outside 1..8"):
        config.resolve("imagenet", workers=8).accumulation(9)


def test_train_workers_ask_for_custom_resources_such_as_a_mock_gpu():
    cfg = config.resolve("sample", worker_resources="mock_gpu=1, fast_disk=0.5", cpus_per_worker=1.0)
    assert cfg.resources_per_worker == {"CPU": 1.0, "mock_gpu": 1.0, "fast_disk": 0.5}
    assert config.resolve("sample").resources_per_worker == {"CPU": 2.0}
    for bad, message in [
        ("mock_gpu=0", "positive amount"),
        ("mock_gpu=lots", "positive amount"),
        ("=1", "NAME=AMOUNT"),
        ("GPU=1", "GPU has its own flag"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config.resolve("sample", worker_resources=bad)
    with pytest.raises(ConfigError, match="data_cpu_limit must be >= 0"):
        config.resolve("sample", data_cpu_limit=-1)


def test_trains_help_is_grouped_and_lists_the_choices_of_fixed_valued_flags():
    grouped = [name for names in config.FLAG_GROUPS.values() for name in names]
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"profile", "min_workers"}
    assert sorted(grouped) == sorted(fields)  # every field in exactly one section
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    text = parser.format_help()
    for title in config.FLAG_GROUPS:
        assert f"\n{title}:\n" in text, title
    assert "--schedule {plateau,step,constant}" in text and "--decode-on {data,train}" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--promote", "sometimes"])
