"""The embedded broker of the demo: kombu's file-system transport, with messages that appear atomically.

kombu writes a message file in place, so a consumer in another process can list it while it is still empty
and fail to decode it. Writing under a name no queue matches and renaming it into place closes that race.
"""

from __future__ import annotations

import json
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem


class Channel(filesystem.Channel):
    # kombu's own base classes name the second parameter differently; this follows filesystem.Channel.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # ends in ".part": never matches "<queue>.msg"
        try:
            with open(partial, "wb") as f:
                # A kombu message is plain JSON by now: its body is already serialized and encoded.
                f.write(json.dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
