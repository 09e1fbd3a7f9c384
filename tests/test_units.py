"""
The systemd units in etc/systemd/ pass C{systemd-analyze verify}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "etc", "systemd")


class UnitTests(SynchronousTestCase):
    def test_verify(self) -> None:
        """
        The service, the socket and the socket-activated service verify
        cleanly (with the install paths pointed at this environment's
        executables, and the user at one that exists here).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        binDir = os.path.dirname(sys.executable)
        if not os.path.exists(os.path.join(binDir, "smtpauth-relay")):
            raise SkipTest("the project is not installed in this environment")
        directory = self.mktemp()
        os.mkdir(directory)
        for name in sorted(os.listdir(UNITS)):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read()
            text = text.replace("/opt/smtpauth-relay/bin/", binDir + "/")
            text = text.replace("User=smtpauth-relay", "User=root")
            text = text.replace("Group=smtpauth-relay", "Group=root")
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        result = subprocess.run(
            [analyze, "verify", *sorted(os.listdir(directory))],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_notifyType(self) -> None:
        """
        Both services are Type=notify, reload with SIGHUP, and bound the
        relay with the hardening the README promises.
        """
        for name in ("smtpauth-relay.service", "smtpauth-relay-activated.service"):
            with open(os.path.join(UNITS, name)) as f:
                lines = f.read().splitlines()
            for expected in (
                "Type=notify",
                "ExecReload=/bin/kill -HUP $MAINPID",
                "NoNewPrivileges=true",
                "ProtectSystem=strict",
                "PrivateTmp=true",
                "SystemCallFilter=@system-service",
            ):
                self.assertIn(expected, lines, name)
