"""Error types the CLI maps to exit codes (see README: 0 ok, 1 gate failed, 2 bad input, 3 runtime failure)."""


class LlmcError(Exception):
    exit_code = 3


class UserError(LlmcError):
    """Bad input: a config, artifact, model path or dataset the user must fix. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config value that fails its schema. The message names the file, the key path and what was expected."""

    def __init__(self, source: str, key: str, expected: str, got=None, *, has_got: bool = True):
        self.source, self.key, self.expected, self.got, self.has_got = source, key, expected, got, has_got
        msg = f"{source}: {key or '<root>'}: expected {expected}"
        if has_got:
            msg += f", got {got!r}"
        super().__init__(msg.replace("\n", "\\n"))  # a key may contain a newline; the error stays one line


class ArtifactError(UserError):
    """An input artifact that is missing, incomplete, from the wrong stage or fails its hashes."""


class GateFailed(LlmcError):
    """A quality/speed gate in `llmc evaluate` was missed. Exit code 1."""

    exit_code = 1
