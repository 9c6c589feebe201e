"""The few exception types the token raises; every transport turns them into one line."""


class CryptobatError(Exception):
    """Anything the token refuses or cannot do; ``str()`` is the one-line answer."""


class Refusal(CryptobatError):
    """A signing request the policy does not allow; the reason goes back as ``fail: <reason>``."""

    @property
    def reason(self) -> str:
        return str(self)


class ConfigurationDisabled(CryptobatError):
    """A state change attempted without a quorum of officers present."""

    def __init__(self) -> None:
        super().__init__("Configuration disabled")


class IntegrityError(CryptobatError):
    """The state store or audit log was changed outside Cryptobat."""


class TokenBusy(CryptobatError):
    """Another process holds this token's store."""
