"""TLS for every gRPC server and channel, from one config type: three PEM file paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files. A server: its certificate and key, plus a CA when clients must present a
    certificate it signed (mTLS). A channel: the CA of the server's certificate, plus a
    client certificate and key when the server asks for one."""

    cert: str | Path | None = None
    key: str | Path | None = None
    ca: str | Path | None = None

    def problems(self, prefix: str, server: bool) -> list[str]:
        """What is wrong with these settings, named as the config fields `<prefix>cert` etc."""
        out = []
        if (self.cert is None) != (self.key is None):
            out.append(f"{prefix}cert and {prefix}key go together, got {prefix}cert="
                       f"{_text(self.cert)!r} {prefix}key={_text(self.key)!r}")
        if server and self.ca is not None and self.cert is None:
            out.append(f"{prefix}ca (client certificates) needs {prefix}cert and {prefix}key, "
                       f"got {prefix}ca={_text(self.ca)!r}")
        if not server and self.cert is not None and self.ca is None:
            out.append(f"{prefix}cert needs {prefix}ca, the CA of the server's certificate")
        return out


def _text(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """TLS from the certificate and key (mutual when a client CA is given); None: plaintext.

    Reads the files now, so a missing one fails at start-up."""
    if files.cert is None or files.key is None:
        return None
    ca = _read(files.ca)
    return grpc.ssl_server_credentials([(Path(files.key).read_bytes(),
                                         Path(files.cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """TLS to a server whose certificate the CA signed (with a client certificate for mTLS);
    None without a CA: plaintext."""
    if files.ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(files.ca),
                                        private_key=_read(files.key),
                                        certificate_chain=_read(files.cert))
