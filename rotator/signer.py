"""The documented import path of the signer (`rotator.library.signer`)."""

from rotator.library.signer import Signer, SigningError

__all__ = ["Signer", "SigningError"]
