"""mkdocs hook: fills each page's measurement placeholders from docs/measurements/*.json at build time.

The placeholders and the records are described in jaxdp_study/measurements.py; the tables are generated on every
build from the newest record of each kind, so they cannot drift from the files.
"""

from __future__ import annotations

import posixpath
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the docs build from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from jaxdp_study import measurements  # noqa: E402


def on_page_markdown(markdown, page, config, files, **kwargs):
    if "<!-- measurement:" not in markdown:
        return markdown
    docs_dir = Path(config["docs_dir"]).resolve()
    directory = measurements.measurements_dir().resolve()
    page_dir = posixpath.dirname(page.file.src_uri)

    def link(record):
        # Records inside docs/ are published with the site: link to the file the table came from.
        try:
            target = Path(record["path"]).resolve().relative_to(docs_dir).as_posix()
        except ValueError:
            return None
        return posixpath.relpath(target, page_dir or ".")

    return measurements.fill_placeholders(markdown, measurements.read_records(directory), link)
