"""Jobs in the test pool that cannot see the submitter's checkout or its venv.

The pool (scripts/htcondor_pool.sh) bind-mounts the checkout and the venv's base Python
into its chroot, and runs every job as its owner, who can read both. This helper makes
jobs that carry ``+CkptTasksIsolated = true`` run as a separate account instead
(``STARTER_ALLOW_RUNAS_OWNER`` is false for them, ``SLOT1_<n>_USER`` names the account),
and denies that account the checkout and the base Python with a POSIX ACL entry for its
uid (written as the ``system.posix_acl_access`` attribute: no acl tools needed). Every
other job runs as before; the ACL entries are removed again afterwards.
"""
from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from pathlib import Path
from typing import Iterator

ISOLATED_USER = "ckptiso"
ISOLATED_UID = 4711
#: the job attribute that selects the isolated account
ISOLATED_ATTRIBUTE = "CkptTasksIsolated"
CONFIG_NAME = "50-ckpt-tasks-isolated.conf"
# Dynamic slots are slot1_1, slot1_2, ...; each needs its own SLOT1_<n>_USER.
DYNAMIC_SLOTS = 64
ACL_XATTR = "system.posix_acl_access"
_UNDEFINED_ID = 0xFFFFFFFF
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def install(pool_sh: Path, pool_dir: Path) -> None:
    """Create the isolated account in the chroot and the starter's configuration for it."""
    subprocess.run(["bash", str(pool_sh), "root-exec",
                    f"getent passwd {ISOLATED_USER} >/dev/null || useradd -M -u {ISOLATED_UID} -U "
                    f"-d /nonexistent -s /usr/sbin/nologin {ISOLATED_USER}"], check=True, capture_output=True)
    # The workers' XRootD client (xrdcp), which a job fetching bundles from the store uses, as
    # WLCG workers have it.
    subprocess.run(["bash", str(pool_sh), "root-exec",
                    "command -v xrdcp >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y "
                    "--no-install-recommends xrootd-client"], check=True, capture_output=True, timeout=600)
    lines = [
        "# ckpt_tasks tests (tests/helpers/isolated_pool.py): jobs with +CkptTasksIsolated = true run",
        f"# as {ISOLATED_USER}, who cannot read the submitter's checkout; all others as their owner.",
        f"STARTER_ALLOW_RUNAS_OWNER = (TARGET.{ISOLATED_ATTRIBUTE} =!= true)",
        f"SLOT1_USER = {ISOLATED_USER}",
        *(f"SLOT1_{n}_USER = {ISOLATED_USER}" for n in range(1, DYNAMIC_SLOTS + 1)),
    ]
    path = pool_dir / "etc" / "condor" / "config.d" / CONFIG_NAME
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
        subprocess.run(["bash", str(pool_sh), "root-exec", "condor_reconfig"], check=True, capture_output=True)


def _deny_acl(path: Path, uid: int) -> bytes:
    """The access ACL of ``path``'s mode bits plus an entry that grants ``uid`` nothing."""
    mode = path.stat().st_mode
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    entries = [(_ACL_USER_OBJ, owner, _UNDEFINED_ID), (_ACL_USER, 0, uid), (_ACL_GROUP_OBJ, group, _UNDEFINED_ID),
               (_ACL_MASK, group, _UNDEFINED_ID), (_ACL_OTHER, other, _UNDEFINED_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


@contextlib.contextmanager
def denied(paths: list[Path], uid: int = ISOLATED_UID) -> Iterator[None]:
    """While inside, ``uid`` can neither list nor enter ``paths`` (which must have no ACL yet)."""
    done = []
    try:
        for path in paths:
            try:
                os.getxattr(path, ACL_XATTR)
                raise RuntimeError(f"{path} has an ACL already; refusing to replace it")
            except OSError:
                pass
            os.setxattr(path, ACL_XATTR, _deny_acl(path, uid))
            done.append(path)
        yield
    finally:
        for path in done:
            os.removexattr(path, ACL_XATTR)
