"""Errors of the library, in the words of its functions: each names the parameter, never a flag.

The library (diffusion, networks, segmentation) is called by the commands and by Python code alike,
so it knows nothing of command lines. A value a function cannot use is a `ParameterError`, a
ValueError whose text starts with the parameter's name:

    schedule_name: unknown schedule 'quadratic' (expected 'linear' or 'cosine')

The command layer, which knows which flag fed which parameter, turns it into the one-line error of
that flag with `cli.flag_names` (the flag's name in place of the parameter's, exit status 2).
"""


class ParameterError(ValueError):
    """A value of `parameter` that the function cannot use; `problem` says why, without the name."""

    def __init__(self, parameter, problem):
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
        self.problem = problem

    def named(self, name):
        """The message with `name` (e.g. a flag) in place of the parameter's name."""
        return f"{name}: {self.problem}"

    def __reduce__(self):
        return type(self), (self.parameter, self.problem)


class ModelConfigError(ParameterError):
    """An impossible network configuration (a shape, a head count, a pooling the network cannot build)."""
