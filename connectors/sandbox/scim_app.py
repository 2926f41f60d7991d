"""The "app" target of the sandbox: scim2-server, an independent SCIM 2.0 implementation, in a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import scim2_server


class ScimApp:
    """A scim2-server process on loopback serving the default schemas plus the given User extensions."""

    def __init__(
        self, folder: Path, token: str, extensions: Sequence[Mapping[str, Any]] = (), port: int = 0
    ) -> None:
        self.folder, self.token, self.extensions = folder, token, list(extensions)
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The SCIM service root a connector is configured with."""
        return f"http://127.0.0.1:{self.port}/v2"

    def start(self, timeout: float = 20.0) -> ScimApp:
        resources = Path(scim2_server.__file__).parent / "resources"
        schemas = json.loads((resources / "default-schemas.json").read_text())
        types = json.loads((resources / "default-resource-types.json").read_text())
        for extension in self.extensions:
            schemas.append(dict(extension))
            types[0].setdefault("schemaExtensions", []).append({"schema": extension["id"], "required": False})
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "schemas.json").write_text(json.dumps(schemas))
        (self.folder / "resource-types.json").write_text(json.dumps(types))
        command = [sys.executable, "-c", "from scim2_server.testserver.cli import main; main()"]
        command += ["--hostname", "127.0.0.1", "--port", str(self.port), "--bearer-token", self.token]
        command += ["--schema", str(self.folder / "schemas.json")]
        command += ["--resource-type", str(self.folder / "resource-types.json")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{self.url}/ServiceProviderConfig", timeout=1)
                return self
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("scim2-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
