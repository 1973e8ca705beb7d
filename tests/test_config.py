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
        ({"workers": 0}, "workers"),
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
    for argv, message in ((["--bogus", "1"], "unrecognized arguments: --bogus"), (["--crop", "10"], "at least 63")):
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
    assert len(helps) == len(dataclasses.fields(TrainConfig))


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
