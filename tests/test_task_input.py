"""Bad input to `law run TrainTask` is refused before any work, naming the parameter."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ckpt_tasks.parameters import (CheckedBoolParameter, CheckedChoiceParameter, InvalidParameterError,
                                   LocationParameter, NonNegativeFloatParameter, PositiveFloatParameter,
                                   PositiveIntParameter)
from test_train_task import LAW, ROOT, law_env, law_index  # noqa: F401  (law_index: the autouse index)


def law_run(cwd: Path, data: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """``law run TrainTask --branch 0 ...`` in ``cwd``, with ``data`` as $CKPT_TASKS_DATA."""
    env = law_env(data)
    if config is not None:
        env["LAW_CONFIG_FILE"] = str(config)
    return subprocess.run([LAW, "run", "TrainTask", "--branch", "0", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def config_with(tmp_path: Path, extra: str) -> Path:
    """law.cfg of the project with ``extra`` sections in place of its [ckpt_tasks] one."""
    text = (ROOT / "law.cfg").read_text()
    text = text[:text.index("[ckpt_tasks]")] + extra
    path = tmp_path / "law.cfg"
    path.write_text(text)
    return path


def assert_refused(result: subprocess.CompletedProcess, flag: str, *places: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert flag in output and "refused before any work" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for place in places:  # nothing trained, no model, no checkpoint, no stray "root:" directory
        assert not any(place.iterdir()), sorted(place.rglob("*"))


@pytest.fixture
def places(tmp_path):
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    data.mkdir()
    return cwd, data


BAD = [
    ("--epochs", "-1"), ("--epochs", "0"), ("--epochs", "1.5"), ("--batch-size", "0"), ("--hidden", "0"),
    ("--step-delay", "-0.5"), ("--storage-timeout", "-1"), ("--stop-deadline", "0"),
    ("--stop-deadline", "inf"), ("--checkpoint-every", "0"), ("--checkpoint-interval", "-1"),
    ("--checkpoint-exit-interval", "nan"), ("--keep-last", "0"), ("--request-cpus", "0"),
    ("--request-gpus", "-1"),
]


@pytest.mark.parametrize("flag,value", BAD)
def test_out_of_range_numbers_are_refused(places, flag, value):
    assert_refused(law_run(*places, flag, value, "--epochs" if flag != "--epochs" else "--hidden", "1"),
                   flag, *places)


@pytest.mark.parametrize("flag,value,accepted", [("--device", "gpu", "one of 'auto', 'cpu', 'cuda'"),
                                                  ("--checkpoint-mode", "foo", "one of 'spool', 'store'"),
                                                  ("--async-checkpoint", "maybe", "true or false")])
def test_a_choice_or_switch_that_is_none_of_its_values_is_refused(places, flag, value, accepted):
    result = law_run(*places, "--epochs", "1", flag, value)
    assert_refused(result, flag, *places)
    assert accepted in result.stdout + result.stderr


@pytest.mark.parametrize("store", ["root:/127.0.0.1//ckpt", "root://", "root//127.0.0.1//ckpt",
                                   "s3://bucket/ckpt", "root://127.0.0.1/relative"])
def test_a_store_that_is_no_valid_url_is_never_a_local_path(places, store):
    result = law_run(*places, "--epochs", "1", "--store", store)
    assert_refused(result, "--store", *places)
    assert "accepted forms" in result.stdout + result.stderr


def test_several_bad_parameters_are_named_at_once(places):
    result = law_run(*places, "--epochs", "0", "--batch-size", "0", "--store", "root:/h//p")
    assert_refused(result, "--epochs", *places)
    assert "--batch-size" in result.stderr + result.stdout and "--store" in result.stderr + result.stdout


def test_a_bad_store_in_law_cfg_is_refused(tmp_path, places):
    config = config_with(tmp_path, "[ckpt_tasks]\nstore: root:/127.0.0.1//ckpt\n")
    result = law_run(*places, "--epochs", "1", config=config)
    assert_refused(result, "[ckpt_tasks] store", *places)


def test_an_unset_variable_in_the_store_is_refused(tmp_path, places):
    config = config_with(tmp_path, "[ckpt_tasks]\nstore: $CKPT_TASKS_UNSET_FOR_TEST/ckpt\n")
    result = law_run(*places, "--epochs", "1", config=config)
    assert_refused(result, "$CKPT_TASKS_UNSET_FOR_TEST", *places)


def test_an_unset_data_directory_is_refused(places):
    cwd, data = places
    env = {k: v for k, v in law_env(data).items() if k != "CKPT_TASKS_DATA"}
    result = subprocess.run([LAW, "run", "TrainTask", "--branch", "0", "--epochs", "1", "--store", str(data)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert_refused(result, "$CKPT_TASKS_DATA is not set", cwd, data)  # no "$CKPT_TASKS_DATA" directory


def test_a_bad_count_in_law_cfg_is_refused(tmp_path, places):
    config = config_with(tmp_path, "[ckpt_tasks]\nstore: $CKPT_TASKS_DATA/checkpoints\n\n"
                                   "[luigi_TrainTask]\nbatch_size: 0\n")
    assert_refused(law_run(*places, "--epochs", "1", config=config), "--batch-size", *places)


def test_refused_also_when_the_outputs_already_exist(tmp_path, places):
    cwd, data = places
    first = law_run(cwd, data, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(data.rglob("*"))
    assert any(path.name == "model.pt" for path in before)
    # insignificant parameters: the same outputs, which exist; the bad value still stops the run
    for flag, value in [("--storage-timeout", "-1"), ("--stop-deadline", "-1"), ("--store", "root:/h//p")]:
        result = law_run(cwd, data, "--epochs", "1", flag, value)
        assert result.returncode == 2 and flag in result.stderr + result.stdout, result.stderr[-3000:]
    assert sorted(data.rglob("*")) == before and not any(cwd.iterdir())


def test_a_relative_store_is_resolved_and_logged_as_absolute(places):
    cwd, data = places
    result = law_run(cwd, data, "--epochs", "1", "--store", "rel/ckpt")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"checkpoints go to {cwd / 'rel' / 'ckpt'}" in output, output[-3000:]
    assert list((cwd / "rel" / "ckpt" / "TrainTask").glob("*/branch-0/LATEST"))


# -- in Python: the same checks raise ----------------------------------------------------------

def test_in_python_a_bad_value_raises_naming_the_parameter():
    from workflows.train import TrainTask

    with pytest.raises(InvalidParameterError, match=r"--epochs -1 is out of range.*>= 1"):
        TrainTask(branch=0, epochs=-1)
    with pytest.raises(InvalidParameterError, match=r"--store='root:/h//p'"):
        TrainTask(branch=0, store="root:/h//p")


def test_in_python_the_store_comes_back_absolute(tmp_path, monkeypatch):
    from workflows.train import TrainTask

    monkeypatch.chdir(tmp_path)
    task = TrainTask(branch=1, store="relative/ckpt/")
    assert task.checkpoint_root() == str(tmp_path / "relative" / "ckpt")
    assert task.checkpoint_location().startswith(f"{tmp_path}/relative/ckpt/TrainTask/")
    url = "root://127.0.0.1:1094//data/ckpt"
    assert TrainTask(branch=1, store=url).checkpoint_root() == url


def test_parameter_bounds():
    count, duration, timeout = PositiveIntParameter(), PositiveFloatParameter(), NonNegativeFloatParameter()
    assert count.checked(1, "--n") == 1 and duration.checked(0.5, "--t") == 0.5
    assert timeout.checked(0, "--t") == 0.0 and isinstance(timeout.checked(3, "--t"), float)
    for parameter, value in [(count, 0), (count, True), (count, 2.0), (count, "3"), (duration, 0.0),
                             (duration, float("inf")), (timeout, -0.1), (timeout, float("nan"))]:
        with pytest.raises(ValueError, match="--x"):
            parameter.checked(value, "--x")
    assert "accepted: an integer >= 1" in PositiveIntParameter(description="epochs").description


def test_choice_and_switch_parameters():
    choice, switch = CheckedChoiceParameter(choices=["a", "b"]), CheckedBoolParameter()
    assert choice.checked(choice.normalize(choice.parse("a")), "--c") == "a"
    assert switch.checked(switch.normalize(switch.parse("False")), "--s") is False
    with pytest.raises(ValueError, match=r"--c 'z' is not one of 'a', 'b'"):
        choice.checked(choice.normalize(choice.parse("z")), "--c")
    with pytest.raises(ValueError, match=r"--s 'perhaps' is not true or false"):
        switch.checked(switch.normalize("perhaps"), "--s")


def test_location_parameter_keeps_urls_and_refuses_near_urls(tmp_path):
    store = LocationParameter()
    assert store.checked("roots://host:1094//a/b", "--store") == "roots://host:1094//a/b"
    assert store.checked(f"file://{tmp_path}/x", "--store") == f"{tmp_path}/x"
    for bad in ("root:/host//p", "root//host//p", "ftp://host/p"):
        with pytest.raises(ValueError, match="--store"):
            store.checked(bad, "--store")
