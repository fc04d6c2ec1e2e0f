"""The two ways a job ends early that are not bugs."""


class InputError(ValueError):
    """A user's file or parameter the engine cannot use. Its message is shown to that user as it is, so it
    says what is wrong and how to fix it, and names no server path."""


class Cancelled(Exception):
    """The caller asked the job to stop; raised between epochs, never in the middle of one."""
