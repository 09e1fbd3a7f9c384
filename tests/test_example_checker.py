"""
The worked example of a checker plugin (C{etc/examples/checker/}) passes
its own test, the operator kit: what README's "Writing a credential checker"
walks through keeps working.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import twisted.plugins

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "etc", "examples", "checker")


def _loadExampleTest() -> object:
    spec = importlib.util.spec_from_file_location(
        "example_test_httpauth", os.path.join(EXAMPLE, "test_httpauth.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_example = _loadExampleTest()


class ExampleCheckerTests(_example.HTTPAuthContractTests):  # type: ignore[name-defined]
    """
    The example's contract test, with the plugin file installed the way
    the README says: dropped into a C{twisted/plugins/} directory.
    """

    def setUp(self) -> None:
        plugins = os.path.join(self.mktemp(), "twisted", "plugins")
        os.makedirs(plugins)
        shutil.copy(os.path.join(EXAMPLE, "smtpauth_relay_httpauth.py"), plugins)
        twisted.plugins.__path__.append(plugins)
        self.addCleanup(twisted.plugins.__path__.remove, plugins)
        super().setUp()
