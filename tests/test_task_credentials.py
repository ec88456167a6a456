"""`law run TrainTask` against a gsi server: a credential refused before or during training
leaves with EXIT_CREDENTIAL_REFUSED and says what to renew; a good one trains."""
from __future__ import annotations

import datetime as dt
import time

import pytest

from ckpt_tasks.stop import EXIT_CREDENTIAL_REFUSED
from test_train_task import LawRun, law_index  # noqa: F401
from xrootd_auth import client_env

ARGS = ("--branch", "0", "--epochs", "1", "--checkpoint-every", "5", "--storage-timeout", "20")


@pytest.fixture(scope="module")
def people(test_pki, tmp_path_factory):
    directory = tmp_path_factory.mktemp("task-proxies")
    alice = test_pki.user("alice")
    return {"alice": alice, "directory": directory}


@pytest.fixture(scope="module")
def gsi_server(make_auth_server, people):
    return make_auth_server(protocol="gsi", authdb="u alice /alice a\n",
                            gridmap={people["alice"].subject: "alice"})


def law_run_with(monkeypatch, tmp_path, test_pki, proxy, store, *extra):
    for key, value in client_env(test_pki, proxy).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    run = LawRun(tmp_path, *ARGS, "--store", store, *extra)
    code = run.finish()
    return code, run.output, time.monotonic() - started


def test_an_expired_proxy_is_refused_before_training(monkeypatch, tmp_path, test_pki, people, gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "expired", lifetime=dt.timedelta(minutes=-1))
    code, output, seconds = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//alice/ckpt")
    assert code == EXIT_CREDENTIAL_REFUSED, output[-3000:]
    assert "refused before training (expired)" in output and "Renew the proxy or token" in output
    assert "starting from scratch" not in output
    assert not list(tmp_path.glob("TrainTask/*/branch-0/model.pt"))


def test_a_store_the_identity_may_not_write_is_refused_before_training(monkeypatch, tmp_path, test_pki, people,
                                                                        gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "valid")
    code, output, seconds = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//bob/ckpt")
    assert code == EXIT_CREDENTIAL_REFUSED, output[-3000:]
    assert "refused before training (storage)" in output
    assert seconds < 60, "a permission denied must not be retried for the storage timeout"
    assert "starting from scratch" not in output


def test_a_good_proxy_trains_and_commits(monkeypatch, tmp_path, test_pki, people, gsi_server):
    proxy = test_pki.proxy(people["alice"], people["directory"] / "good")
    code, output, _ = law_run_with(monkeypatch, tmp_path, test_pki, proxy, f"{gsi_server.url}//alice/good")
    assert code == 0, output[-3000:]
    assert "preflight:" in output and "training complete" in output
    assert proxy.read_text().split("-----BEGIN RSA PRIVATE KEY-----")[1][:40] not in output


def test_a_refused_final_commit_exits_88_other_failures_1(tmp_path):
    # The commit on a stop is caught by the Checkpointer (its failure must not claim 85);
    # a refused credential there must still say "held: renew it".
    from ckpt_tasks.errors import StorageAuthenticationFailed, StorageUnavailable
    from ckpt_tasks.state import TrainingState
    from ckpt_tasks.stop import EXIT_CHECKPOINT_FAILED
    from ckpt_tasks.storage.store import CheckpointStore
    from ckpt_tasks.tasks import TaskCheckpointer
    from ckpt_tasks.transfer import StoreTransfer

    state = TrainingState()
    transfer = StoreTransfer(CheckpointStore(tmp_path / "store"), step_of=lambda: state.step, params={})
    ckpt = TaskCheckpointer(tmp_path, state, transfer, handle_signals=False)
    assert ckpt.exit_code_for(StorageAuthenticationFailed("token expired", "root://h//p")) == EXIT_CREDENTIAL_REFUSED
    assert ckpt.exit_code_for(StorageUnavailable("down", "root://h//p")) == EXIT_CHECKPOINT_FAILED
