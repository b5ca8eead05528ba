"""Every relative link in README.md and docs/*.md resolves: the file exists, a `#anchor` into a
markdown file names one of its headings (GitHub's slugs), and a link whose text names a test
(`test_foo` or `test_foo[params]`, as README's framework-coverage table writes them) points to a
file that defines that test function."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")  # a label may hold [params]
TEST_NAME = re.compile(r"`?(test_\w+)")


def heading_slugs(page: pathlib.Path) -> set:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces -> '-'."""
    slugs = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return slugs


def relative_links(page: pathlib.Path):
    for label, target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        yield label, target


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    links = list(relative_links(page))
    broken = []
    for label, target in links:
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve()
        if not path.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in heading_slugs(path):
            broken.append(f"{target}: no heading #{anchor}")
        test = TEST_NAME.match(label)
        if test and path.suffix == ".py" and not re.search(rf"^def {test.group(1)}\(", path.read_text(), re.M):
            broken.append(f"[{label}]({target}): {path.name} defines no {test.group(1)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "test_x.py").write_text("def test_here():\n    pass\n")
    page.write_text("[a](missing.py) [`test_gone[p]`](test_x.py) [`test_here`](test_x.py) [b](page.md#nope)\n")
    labels = [label for label, _ in relative_links(page)]
    assert labels == ["a", "`test_gone[p]`", "`test_here`", "b"]
    with pytest.raises(AssertionError) as failure:
        test_relative_links_resolve(page)
    message = str(failure.value)
    assert "missing.py: no such file" in message and "defines no test_gone" in message
    assert "#nope" in message and "test_here" not in message.split("defines no")[-1]
