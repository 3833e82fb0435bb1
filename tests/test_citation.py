"""LICENSE and CITATION.cff agree with each other and with pyproject.toml, and cite what the code builds on."""
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the first line of each licence text this project may carry -> its SPDX identifier
LICENCE_HEADINGS = {"Apache License": "Apache-2.0", "MIT License": "MIT"}


def spdx_of(licence_text: str) -> str:
    """SPDX id of a standard licence text, from its heading (first non-empty line)."""
    heading = next(line.strip() for line in licence_text.splitlines() if line.strip())
    for start, spdx in LICENCE_HEADINGS.items():
        if heading.startswith(start):
            return spdx
    raise ValueError(f"LICENSE heading {heading!r} is not one of {sorted(LICENCE_HEADINGS)}")


@pytest.fixture(scope="module")
def cff():
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def test_license_is_a_full_standard_text_with_the_copyright_line():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert spdx_of(text) == "Apache-2.0"
    assert "END OF TERMS AND CONDITIONS" in text, "the full licence text, not a summary"
    assert "Copyright 2026 The MediScopeDiffusion authors" in text
    assert "[yyyy]" not in text and "[name of copyright owner]" not in text


def test_spdx_of_rejects_an_unknown_heading():
    with pytest.raises(ValueError, match="not one of"):
        spdx_of("\nGNU GENERAL PUBLIC LICENSE\n")


def test_citation_has_the_required_fields(cff):
    assert cff["cff-version"] == "1.2.0"
    assert cff["message"].strip()
    assert "MediScopeDiffusion" in cff["title"]
    assert {"name": "The MediScopeDiffusion authors"} in cff["authors"]


def test_citation_licence_is_the_license_files(cff):
    assert cff["license"] == spdx_of((ROOT / "LICENSE").read_text(encoding="utf-8"))


def test_pyproject_agrees_with_the_citation(cff):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    licence = project.get("license")
    if isinstance(licence, dict):  # PEP 621 table form: {file = "LICENSE"} or {text = "..."}
        assert licence.get("file", "LICENSE") == "LICENSE"
        licence = licence.get("text")
    if licence is not None:  # PEP 639 SPDX expression or the table's text
        assert licence == cff["license"]
    if "version" in project:
        assert str(cff.get("version")) == project["version"]


@pytest.mark.parametrize("needle", ["DiffMIC:", "DiffMIC-v2", "CARD", "MosMedData", "MedMNIST v2",
                                    "Denoising Diffusion Implicit Models", "MONAI"])
def test_citation_references_what_the_code_builds_on(cff, needle):
    titles = [ref["title"] for ref in cff["references"]]
    assert any(needle in title for title in titles), f"no reference titled with {needle!r} in {titles}"


def test_every_reference_is_complete(cff):
    for ref in cff["references"]:
        assert ref["type"] and ref["title"] and ref["authors"], ref.get("title")
        assert ref.get("year") or ref.get("doi"), f"{ref['title']}: a year or a DOI to find it by"
        if "doi" in ref:
            assert re.fullmatch(r"10\.\d{4,9}/\S+", str(ref["doi"])), ref["doi"]
