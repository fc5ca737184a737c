"""Lightning callbacks of skillbank, installed as ``skillbank.callbacks``."""

__all__: list[str] = []
