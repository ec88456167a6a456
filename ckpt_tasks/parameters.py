"""Task parameters with their accepted values, checked before a task does any work.

A parameter declares what it accepts where it is defined::

    epochs = PositiveIntParameter(default=20, description="training epochs")
    stop_deadline = PositiveFloatParameter(default=300.0, description="...")
    storage_timeout = NonNegativeFloatParameter(default=120.0, description="...")
    store = LocationParameter(description="...")

and :func:`check_parameters`, called by ``CheckpointedTask.modify_param_values`` (law's hook
that runs whenever a task is instantiated, before ``complete()`` is ever asked), checks
every such parameter of the task at once, whatever the value came from: the command line,
law.cfg or Python. Under ``law run`` (or ``luigi``) a refused value ends the command with
exit code 2 and one error line per bad parameter; in Python it raises
:class:`InvalidParameterError`.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn

import law
import luigi

from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.storage.location import validate_location

logger = logging.getLogger(__name__)

#: the exit code of ``law run`` when a parameter is refused (that of a command-line usage error)
USAGE_EXIT_CODE = 2
#: where a CheckpointedTask keeps checkpoints when neither ``--store`` nor law.cfg says
DEFAULT_STORE = "$CKPT_TASKS_DATA/checkpoints"
CONFIG_SECTION, CONFIG_OPTION = "ckpt_tasks", "store"
_UNEXPANDED_RE = re.compile(r"\$(\w+|\{\w+\})")


class InvalidParameterError(CkptTasksError, ValueError):
    """A task parameter has a value outside the accepted ones; the message names both."""


class CheckedParameter:
    """A mixin for luigi parameters that know what they accept.

    ``checked(value, flag)`` returns the value to use (possibly normalised) or raises
    ``ValueError`` naming ``flag`` (``--epochs``) and what is accepted; ``accepted`` says
    it in words, for ``--help``.
    """

    accepted: str = ""

    def checked(self, value: Any, flag: str) -> Any:  # pragma: no cover - subclasses override it
        raise NotImplementedError

    def _with_accepted(self, kwargs: dict) -> dict:
        description = kwargs.get("description")
        kwargs["description"] = f"{description}; accepted: {self.accepted}" if description \
            else f"accepted: {self.accepted}"
        return kwargs


class _BoundedNumber(CheckedParameter):
    """A finite number of ``kind`` at least (or, ``exclusive``, above) ``minimum``."""

    kind: type = int
    kind_text = "an integer"

    def __init__(self, *args, minimum: float, exclusive: bool = False, **kwargs):
        self.minimum, self.exclusive = minimum, exclusive
        self.accepted = f"{self.kind_text} {'>' if exclusive else '>='} {minimum}"
        super().__init__(*args, **self._with_accepted(kwargs))

    def parse(self, x: Any) -> Any:
        # Text that is no number is kept as it is, so that checked() refuses it with the
        # parameter's name instead of luigi failing with a bare ValueError and a traceback.
        try:
            return super().parse(x)
        except (TypeError, ValueError):
            return x

    def checked(self, value: Any, flag: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            raise ValueError(f"{flag} {value!r} is not {self.accepted}")
        if value < self.minimum or (self.exclusive and value == self.minimum):
            raise ValueError(f"{flag} {value!r} is out of range: accepted is {self.accepted}")
        return self.kind(value)


class BoundedIntParameter(_BoundedNumber, luigi.IntParameter):
    """An integer parameter with a lower bound, e.g. ``BoundedIntParameter(minimum=0)``."""


class BoundedFloatParameter(_BoundedNumber, luigi.FloatParameter):
    """A finite float parameter with a lower bound (``exclusive``: the bound itself is refused)."""

    kind, kind_text = float, "a finite number"


class PositiveIntParameter(BoundedIntParameter):
    """A count of at least 1 (epochs, a batch size, steps between checkpoints)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, minimum=1, **kwargs)


class NonNegativeIntParameter(BoundedIntParameter):
    """A count that may be 0 (GPUs per job)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, minimum=0, **kwargs)


class PositiveFloatParameter(BoundedFloatParameter):
    """A duration above 0 seconds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, minimum=0, exclusive=True, **kwargs)


class NonNegativeFloatParameter(BoundedFloatParameter):
    """A duration of 0 seconds or more (0 often meaning "never" or "off")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, minimum=0, **kwargs)


class CheckedChoiceParameter(CheckedParameter, luigi.ChoiceParameter):
    """One of ``choices`` (luigi's ChoiceParameter, refused with the parameter's name)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # luigi's description already lists the choices
        self.accepted = "one of " + ", ".join(repr(choice) for choice in sorted(self._choices))

    def parse(self, x: Any) -> Any:
        try:
            return super().parse(x)
        except (TypeError, ValueError):
            return x  # refused, with its name, by checked()

    def normalize(self, x: Any) -> Any:
        return x  # luigi's raises without naming the parameter; checked() refuses instead

    def checked(self, value: Any, flag: str) -> Any:
        if value not in self._choices:
            raise ValueError(f"{flag} {value!r} is not {self.accepted}")
        return value


class CheckedBoolParameter(CheckedParameter, luigi.BoolParameter):
    """True or False (luigi's BoolParameter, whose normalize turns other text into None)."""

    accepted = "true or false"

    def parse(self, x: Any) -> Any:
        try:
            return super().parse(x)
        except ValueError:
            return x  # refused, with its name, by checked()

    def normalize(self, x: Any) -> Any:
        return x if isinstance(x, bool) else self.parse(x)

    def checked(self, value: Any, flag: str) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{flag} {value!r} is not {self.accepted}")
        return value


class LocationParameter(CheckedParameter, luigi.Parameter):
    """A storage location: an absolute or relative path, ``file:///...``, ``root(s)://host//path``.

    Empty means ``[ckpt_tasks] store`` of law.cfg (default ``$CKPT_TASKS_DATA/checkpoints``).
    Environment variables are expanded; the checked value is the normalised location
    (:func:`ckpt_tasks.storage.location.validate_location`): a relative path comes back
    absolute, and a value that looks like a URL but is not a valid one is refused.
    """

    accepted = "a path, file:///abs/path or root(s)://host[:port]//abs/path; empty: [ckpt_tasks] store"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **self._with_accepted(kwargs))

    def checked(self, value: Any, flag: str) -> str:
        if value in ("", None):
            flag = f"[{CONFIG_SECTION}] {CONFIG_OPTION} (law.cfg, as {flag} is not given)"
            value = law.config.get_expanded(CONFIG_SECTION, CONFIG_OPTION, default=DEFAULT_STORE)
        text = os.path.expandvars(str(value))
        unset = _UNEXPANDED_RE.search(text)
        if unset:
            raise ValueError(f"{flag}={value!r} names the environment variable {unset.group(0)}, "
                             "which is not set")
        location = validate_location(text, parameter=flag)
        if not re.match(r"^(/|~|[A-Za-z][A-Za-z0-9+.-]*:)", text):
            logger.info("the store %r is a relative path: checkpoints go to %s", text, location)
        return location.rstrip("/") or "/"


def check_parameters(task_cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every :class:`CheckedParameter` of ``task_cls`` in ``values``; return the checked values.

    Also refused: an environment variable that ``task_cls.required_environment`` names and
    that is not set (``os.path.expandvars`` would leave ``$NAME`` in a path, making a
    directory of that name). Every refusal is reported at once, each with its value and
    what is accepted; see :func:`refuse` for how.
    """
    params = dict(task_cls.get_params())
    checked, errors = dict(values), []
    for variable in getattr(task_cls, "required_environment", ()):
        if not os.environ.get(variable):
            errors.append(f"${variable} is not set ({task_cls.get_task_family()} writes its outputs "
                          "under it; setup.sh sets it)")
    for name, value in values.items():
        param = params.get(name)
        if not isinstance(param, CheckedParameter):
            continue
        try:
            checked[name] = param.checked(value, "--" + name.replace("_", "-"))
        except ValueError as error:
            errors.append(str(error))
    if errors:
        refuse(task_cls.get_task_family(), errors)
    return checked


def _under_command_line() -> bool:
    """True while ``law run`` or ``luigi`` parses its command line and builds its tasks."""
    from luigi.cmdline_parser import CmdlineParser

    return CmdlineParser.get_instance() is not None


def refuse(task_family: str, errors: list[str]) -> NoReturn:
    """Refuse a task's parameters: ``InvalidParameterError`` in Python; under a command line,
    the errors on stderr and exit code 2 (luigi would wrap the error in a traceback)."""
    message = f"{task_family}: refused before any work: " + "; ".join(errors)
    if not _under_command_line():
        raise InvalidParameterError(message)
    # law has set up logging by now; without handlers, logging's last resort prints it on stderr.
    logger.error(message)
    raise SystemExit(USAGE_EXIT_CODE)
