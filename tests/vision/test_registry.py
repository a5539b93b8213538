"""Registry: register, create, list, helpful errors."""

import pytest

from vision.registry import Registry, RegistryError


def test_register_create_list():
    reg = Registry("widget")

    @reg.register("double")
    def double(x=1):
        return 2 * x

    reg.add("triple", lambda x=1: 3 * x)
    assert reg.create("double", x=4) == 8
    assert reg.create("triple") == 3
    assert reg.names() == ["double", "triple"]
    assert "double" in reg and "nope" not in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("double", double)
    reg.add("double", lambda x=1: x, override=True)
    assert reg.create("double", x=5) == 5


def test_unknown_name_suggests_close_matches():
    reg = Registry("backbone")
    reg.add("resnet50", lambda: 0)
    reg.add("resnet18", lambda: 0)
    with pytest.raises(RegistryError) as e:
        reg.create("resnet05")
    msg = str(e.value)
    assert "unknown backbone 'resnet05'" in msg and "Did you mean" in msg and "resnet50" in msg


def test_fallback():
    reg = Registry("thing")
    reg.set_fallback(lambda name, **kw: (name, kw), lambda n: n.startswith("x"), lambda: ["xa", "xb"])
    assert reg.create("xa", k=1) == ("xa", {"k": 1})
    with pytest.raises(RegistryError, match="xa"):
        reg.create("ya")


def test_unregister():
    from vision.registry import Registry, RegistryError

    reg = Registry("thing")
    reg.add("a", lambda: 1)
    reg.unregister("a")
    assert "a" not in reg and len(reg) == 0
    with pytest.raises(RegistryError, match="not registered"):
        reg.unregister("a")
