"""One module per aggregation method; importing this package registers them all."""

from . import fedex, fedhl, fedit, ffa, flexlora, flora, fra, hetlora, hexa  # noqa: F401
