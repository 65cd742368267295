"""Optional TLS on the DICOM port (from configuration), with a real TLS handshake."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
)

from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.synthetic import make_chest_radiograph


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_store_over_tls(
    node_factory: Callable[..., NodeRuntime], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    node = node_factory(
        dicom={"tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)}}
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ds = make_chest_radiograph(seed=41, rows=128, cols=104).dataset
    assoc = ae.associate(
        "127.0.0.1", node.scp.port, ae_title="MEDGEMMA", tls_args=(client, "127.0.0.1")
    )
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    assert node.ledger.find_instance(ds.SOPInstanceUID) is not None

    # a plain (non-TLS) association to the TLS port gets nowhere
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    plain.acse_timeout = plain.network_timeout = 5
    assoc = plain.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    assert not assoc.is_established


def test_tls_without_certificate_is_a_clear_error(tmp_path: Path) -> None:
    from node.scp import make_ssl_context
    from node.settings import TlsSettings

    with pytest.raises(ValueError, match=r"needs dicom\.tls\.cert_file"):
        make_ssl_context(TlsSettings(enabled=True))
