"""How a run ends other than by finishing: user mistakes (one line, exit 2) and requested stops (a signal).

A traceback out of ``upo-train`` means a bug in upo; everything a user can cause is one of these.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input (flags, config, data). Reported as one line, no traceback.

    ``reported_by_main``: under ``torchrun`` the same refusal reaches every rank; only rank 0
    prints it, so the terminal shows it once.
    """

    def __init__(self, message: str, reported_by_main: bool = False):
        super().__init__(message)
        self.reported_by_main = reported_by_main


class SettingError(UserError):
    """A bad value of one setting; ``setting`` (a TrainConfig field) lets the caller say where it came from
    (a flag, or the config file and line)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


class RunStopped(Exception):
    """The run stopped on a signal after a checkpoint was written: ``message`` is the one line to print,
    ``exit_code`` 128 + the signal number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopNow(BaseException):
    """A second stop signal: leave at once, without the checkpoint (BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it)."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code
