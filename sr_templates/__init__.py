"""DICOM results: coded concepts, the chest sign ontology, TID 1500 SR and SEG builders."""
