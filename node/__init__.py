"""medgemma-node: the hospital-facing DICOM/FHIR service (no torch imports here)."""

__version__ = "0.1.0"
