"""
What the tests of every credential checker plugin check alike: that strcred
finds it and it provides what it declares, and that its plugin file stays
thin (it runs in every C{twistd}, so it imports nothing heavy and never the
reactor).  The subprocesses run a fresh interpreter in the source tree, so
nothing the test run imported already hides an import.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from twisted.cred.strcred import ICheckerFactory, findCheckerFactory
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.e2e_support import REPO_ROOT


def assertCheckerFactory(
    test: SynchronousTestCase,
    authType: str,
    helpMentions: str,
    interfaceNames: Sequence[str],
) -> Any:
    """
    Assert that strcred finds the plugin C{authType}, that it provides
    L{ICheckerFactory} and L{IPlugin}, that its help mentions
    C{helpMentions} and that its credential interfaces are named
    C{interfaceNames}, in order.

    @return: The plugin.
    """
    factory = findCheckerFactory(authType)
    test.assertTrue(verifyObject(ICheckerFactory, factory))
    test.assertTrue(verifyObject(IPlugin, factory))
    test.assertEqual(factory.authType, authType)
    test.assertIn(helpMentions, factory.authHelp)
    test.assertEqual(
        [i.__name__ for i in factory.credentialInterfaces], list(interfaceNames)
    )
    return factory


def _runPython(code: str, *arguments: str) -> str:
    """
    Run C{code} in a fresh interpreter in the source tree, with
    C{arguments} as C{sys.argv[1:]}; what it printed.
    """
    return subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def pluginImports(plugin: str, heavy: Sequence[str]) -> list[str]:
    """
    The modules of C{heavy} that importing C{twisted.plugins.PLUGIN} (the
    file of this source tree) imports, sorted.
    """
    code = (
        "import importlib, sys\n"
        "p = importlib.import_module('twisted.plugins.' + sys.argv[2])\n"
        "assert p.__file__.startswith(sys.argv[1]), p.__file__\n"
        "print('\\n'.join(sorted(m for m in sys.argv[3:] if m in sys.modules)))\n"
    )
    return _runPython(code, REPO_ROOT, plugin, *heavy).split()


def checkerMadeAlone(argument: str) -> str:
    """
    In a fresh interpreter, C{makeChecker(argument)} (as C{check-config}
    does): the class name of the checker and whether the global reactor got
    imported, as C{"NAME False"}.
    """
    code = (
        "import sys\n"
        "from twisted.cred.strcred import makeChecker\n"
        "checker = makeChecker(sys.argv[1])\n"
        "print(type(checker).__name__, 'twisted.internet.reactor' in sys.modules)\n"
    )
    return _runPython(code, argument).strip()
