"""The one list of methods. Each method registers itself beside its class, as timm's models do:

    @register_method("byol", BYOLConfig, views=2, test_overrides=(...))
    class BYOL(SSLMethod): ...

The registration is all sslrun needs to know about a method: configs are validated against its
schema (and its `check`), the view count is checked against the augmentation, image-text methods
get captions, and the generic tests (N processes == 1, the FSDP step, a CLI run) iterate it. A
method a generic test cannot run says why in `exempt`, next to its registration.
"""

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

# The generic tests a method may be exempt from (tests/methods/test_registry.py).
GENERIC_TESTS = ("two_processes", "fsdp", "cli")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    schema: type  # the dataclass typing `method.*`; schema.check(cfg) validates its values
    views: Optional[int]  # views per image the method takes; None: any number (multi-crop)
    image_text: bool  # batches carry `text`: the data module captions and tokenizes
    test_overrides: Tuple[str, ...]  # method.* overrides at toy sizes, for the generic tests
    exempt: Mapping[str, str] = field(default_factory=dict)  # generic test -> why it does not run


METHODS: Dict[str, MethodSpec] = {}


def register_method(name: str, schema: type, *, views: Optional[int], image_text: bool = False,
                    test_overrides: Tuple[str, ...] = (), exempt: Optional[Mapping[str, str]] = None):
    """Class decorator: add the method to METHODS under `name` (its `method.name`)."""
    unknown = set(exempt or {}) - set(GENERIC_TESTS)
    if unknown:
        raise ValueError(f"{name}: exempt from unknown tests {sorted(unknown)}; the generic tests are {GENERIC_TESTS}")

    def register(cls: type) -> type:
        if name in METHODS and METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice: {METHODS[name].cls.__name__} and {cls.__name__}")
        METHODS[name] = MethodSpec(name, cls, schema, views, image_text, tuple(test_overrides), dict(exempt or {}))
        cls.spec = METHODS[name]
        return cls

    return register


def registered() -> Dict[str, MethodSpec]:
    """Every method: importing sslrun.methods imports each module of the package."""
    import sslrun.methods  # noqa: F401  (the modules register themselves)

    return METHODS
