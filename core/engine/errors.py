"""The two ways a job ends early that are not bugs."""


class InputError(ValueError):
    """A user's file or parameter the engine cannot use. Its message is shown to that user as it is, so it
    says what is wrong and how to fix it, and names no path of the service's own: a path it names (a pattern
    file's) is one the user gave the command line."""


class Cancelled(Exception):
    """The caller asked the job to stop; raised between epochs, never in the middle of one."""
