"""A storage client process for the authentication tests (tests/xrootd_auth.py starts it).

``python auth_client.py OPERATION LOCATION [ARG...]`` prints one JSON answer,
``{"ok": ..., "error": class name, "errors": its classes, "reason": ..., "message": ...,
"seconds": ...}``, with OPERATION one of

- ``save STEP``: a checkpoint whose content is ``step-STEP``; ``list``; ``restore``;
- ``remove NAME``: a file of the location, through the store's backend;
- ``preflight [MIN_LIFETIME_SECONDS]``: ``ckpt_tasks.preflight.preflight``;
- ``train STEPS FORBIDDEN``: a small training (:func:`_train`), logging everything;
- ``serve``: one operation per line of stdin, each answered on a line of stdout, all in
  this process (its XRootD connections outlive single operations, as in a training).

The credentials are the environment's: the XRootD client reads them once per process.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run the operation of ``argv`` (see the module's docstring)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from ckpt_tasks.storage import CheckpointStore, RetryPolicy

    operation, location, *args = argv
    if operation == "train":  # everything, the XRootD client's messages too, to be searched
        logging.getLogger().setLevel(logging.DEBUG)
    store = CheckpointStore(location, retry=RetryPolicy(deadline=float(os.environ.get("AUTH_TEST_DEADLINE", "20")),
                                                        initial_delay=0.2))
    requests = (line.split() for line in sys.stdin) if operation == "serve" else iter([[operation, *args]])
    for request in requests:
        print(json.dumps(_operate(store, location, request[0], request[1:])), flush=True)
    return 0


def _operate(store, location: str, operation: str, args: list[str]) -> dict:
    start = time.monotonic()
    answer: dict = {"ok": True}
    try:
        with tempfile.TemporaryDirectory() as work:
            if operation == "save":
                source = Path(work) / "state.bin"
                source.write_bytes(f"step-{args[0]}".encode())
                answer["step"] = store.save(source, int(args[0])).step
            elif operation == "list":
                answer["steps"] = [checkpoint.step for checkpoint in store.list()]
            elif operation == "restore":
                checkpoint = store.restore(Path(work) / "restored.bin")
                answer["step"] = checkpoint.step if checkpoint else None
                answer["content"] = (Path(work) / "restored.bin").read_text() if checkpoint else None
            elif operation == "remove":
                answer["removed"] = store.files.remove(f"{store.root}/{args[0]}", silent=False)
            elif operation == "train":
                answer["steps"] = _train(location, int(args[0]), args[1], Path(work))
            elif operation == "preflight":
                from ckpt_tasks.preflight import preflight

                report = preflight(location, min_lifetime=float(args[0]) if args else None, deadline=5.0)
                answer["warnings"] = list(report.warnings)
                answer["credentials"] = [str(credential) for credential in report.credentials]
            else:
                raise SystemExit(f"unknown operation {operation!r}")
    except Exception as error:  # the answer names what the store raised
        answer = {"ok": False, "error": type(error).__name__, "reason": getattr(error, "reason", None),
                  "errors": [cls.__name__ for cls in type(error).__mro__], "message": str(error)}
    answer["seconds"] = round(time.monotonic() - start, 2)
    return answer


def _train(location: str, steps: int, forbidden: str, work: Path) -> list[int]:
    """A small training that runs the preflight, commits through the store every step, keeps
    a copy with the seed's Checkpointer in xrootd mode, restores, and provokes one refusal
    (a preflight of the directory ``forbidden``), logging all of it."""
    import torch

    from ckpt_tasks import Checkpointer
    from ckpt_tasks.jobenv.credentials import find_credentials
    from ckpt_tasks.preflight import PreflightRefused, preflight
    from ckpt_tasks.storage import CheckpointStore

    log = logging.getLogger("auth-train")
    log.info("credentials: %s", find_credentials())
    preflight(location, expected_duration=86400, deadline=5.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    store = CheckpointStore(location, keep_last=2)
    server, _, path = location.partition("//")[2].partition("/")
    seed = Checkpointer(work / "seed.pt", lambda where, value: torch.save(value, where),
                        lambda where: torch.load(where, weights_only=True), checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target=f"/{path}/seed.pt",
                        xrootd_server_name=location.partition("//")[0] + "//" + server, handle_signals=False)
    for step in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        torch.save(model.state_dict(), work / "state.pt")
        store.save(work / "state.pt", step, metadata={"loss": float(loss)})
        seed.step(model.state_dict())
    store.restore(work / "restored.pt")
    try:
        preflight(forbidden, deadline=5.0)
    except PreflightRefused:
        log.exception("the refusal, as a user would see it")
    return [checkpoint.step for checkpoint in store.list()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
