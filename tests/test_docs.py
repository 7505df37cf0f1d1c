"""Every reference in the repository resolves inside it.

- relative markdown links in README.md and docs/ point at files that exist;
- every `docs/...` path cited in code, configs and docs exists, and a `docs/methods/<page>.md §N` citation names a
  heading numbered N on that page;
- a method citation `<page>.md §N` says where the page is (`docs/methods/<page>.md §N`), except between the
  pages of docs/methods, where it names a sibling page and one of its headings;
- nothing refers to material outside the repository.

No torch import: these tests read text only.
"""
import os
import re
import subprocess
import sys
from typing import Dict, List, Set
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, '/')

TEXT_SUFFIXES = ('.py', '.yaml', '.yml', '.md', '.sh', '.txt', '.ini', '.cfg', '.toml')
TEXT_FILES_WITHOUT_SUFFIX = ('.ci/run',)
SKIPPED_DIRS = {'.git', '.venv', '__pycache__', '.pytest_cache', 'output'}

# [text](target) or ![alt](target), with an optional "title"; the target may be wrapped in <...>.
MARKDOWN_LINK = re.compile(r'!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCED_CODE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r'`[^`\n]*`')
# A repository-relative docs path: not part of a longer path or URL, ending in a file extension.
DOCS_CITATION = re.compile(r'(?<![\w./-])(docs/[\w./-]*?\.(?:md|png|svg|jpg|jpeg|gif|csv|json|txt|yaml))(?![\w-])')
SECTION_CITATION = re.compile(r'(?<![\w./-])(docs/methods/[\w.-]+\.md)\s*§\s*(\d+(?:\.\d+)*)')
# `page.md §N` not preceded by a folder: fine between sibling pages of docs/methods, a dead end anywhere else.
BARE_SECTION_CITATION = re.compile(r'(?<![\w/.-])([\w-]+\.md)\s*§\s*(\d+(?:\.\d+)*)')
METHOD_PAGES = 'docs/methods'
NUMBERED_HEADING = re.compile(r'^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?=\s)', re.MULTILINE)
# spelled in parts, so that a plain search of the repository for these words finds no file, this one included
OUTSIDE_REFERENCES = ('../' + 'shared', 'shared' + '/methods', 'search' + ' tool')


def repository_files() -> List[str]:
    """Tracked files plus new files not yet committed (never ignored ones), as repository-relative paths."""
    try:
        out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                             cwd=ROOT, capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split('\0') if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree instead
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
            rel = os.path.relpath(dirpath, ROOT)
            files += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, '/') for f in filenames]
    return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)))


def is_text_file(path: str) -> bool:
    return path.endswith(TEXT_SUFFIXES) or path in TEXT_FILES_WITHOUT_SUFFIX


def read_text(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding='utf-8', errors='replace') as f:
        return f.read()


def markdown_link_targets(text: str) -> List[str]:
    """Link targets outside code blocks and code spans (examples in code are not links)."""
    text = INLINE_CODE.sub('', FENCED_CODE.sub('', text))
    return MARKDOWN_LINK.findall(text)


def is_local_target(target: str) -> bool:
    return not (target.startswith('#') or re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target))


def resolve_link(source: str, target: str) -> str:
    """Absolute path of a relative link target found in the repository file `source`."""
    path = unquote(target.split('#', 1)[0].split('?', 1)[0])
    base = ROOT if path.startswith('/') else os.path.join(ROOT, os.path.dirname(source))
    return os.path.normpath(os.path.join(base, path.lstrip('/')))


def heading_numbers(text: str) -> Set[str]:
    """{'1', '4', '4.2', ...}: the numbers that start the page's headings ('## 4. NKD', '### 4.2 Closed form')."""
    return set(NUMBERED_HEADING.findall(FENCED_CODE.sub('', text)))


def broken_links(files: List[str]) -> List[str]:
    broken = []
    for path in files:
        for target in markdown_link_targets(read_text(path)):
            if is_local_target(target) and not os.path.exists(resolve_link(path, target)):
                broken.append(f'{path}: [..]({target})')
    return broken


def broken_citations(files: List[str]) -> List[str]:
    broken = []
    headings: Dict[str, Set[str]] = {}
    for path in files:
        text = read_text(path)
        for cited in sorted(set(DOCS_CITATION.findall(text))):
            if not os.path.isfile(os.path.join(ROOT, cited)):
                broken.append(f'{path}: {cited} does not exist')
        for page, number in sorted(set(SECTION_CITATION.findall(text))):
            if not os.path.isfile(os.path.join(ROOT, page)):
                continue  # reported above
            if page not in headings:
                headings[page] = heading_numbers(read_text(page))
            if number not in headings[page]:
                broken.append(f'{path}: {page} §{number} has no heading numbered {number}')
    return broken


def unresolved_bare_citations(files: List[str]) -> List[str]:
    """Citations `page.md §N` without a folder: outside docs/methods they must say docs/methods/page.md; inside it
    they name a sibling page, which must exist and have that heading."""
    pages_dir = os.path.join(ROOT, METHOD_PAGES)
    pages = {f for f in os.listdir(pages_dir) if f.endswith('.md')} if os.path.isdir(pages_dir) else set()
    broken = []
    for path in files:
        inside = os.path.dirname(path) == METHOD_PAGES
        for page, number in sorted(set(BARE_SECTION_CITATION.findall(read_text(path)))):
            if inside:
                if page not in pages:
                    broken.append(f'{path}: {page} §{number}: no page {METHOD_PAGES}/{page}')
                elif number not in heading_numbers(read_text(f'{METHOD_PAGES}/{page}')):
                    broken.append(f'{path}: {page} §{number} has no heading numbered {number}')
            elif page in pages and page != 'README.md':
                broken.append(f'{path}: {page} §{number} should be cited as {METHOD_PAGES}/{page} §{number}')
    return broken


@pytest.fixture(scope='module')
def files():
    found = repository_files()
    assert 'README.md' in found and 'train.py' in found, 'the repository listing missed its own top-level files'
    return found


def test_markdown_links_resolve(files):
    markdown = [f for f in files if f.endswith('.md') and f != THIS_FILE]
    assert any(f.startswith('docs/') for f in markdown), 'no documentation pages found under docs/'
    broken = broken_links(markdown)
    assert not broken, f'{len(broken)} relative links point at missing files:\n' + '\n'.join(broken)


def test_docs_citations_resolve(files):
    text_files = [f for f in files if is_text_file(f) and f != THIS_FILE]
    broken = broken_citations(text_files)
    assert not broken, f'{len(broken)} docs/ citations do not resolve:\n' + '\n'.join(broken)


def test_method_citations_name_their_page(files):
    text_files = [f for f in files if is_text_file(f) and f != THIS_FILE]
    broken = unresolved_bare_citations(text_files)
    assert not broken, f'{len(broken)} method citations do not resolve:\n' + '\n'.join(broken)


def test_nothing_refers_outside_the_repository(files):
    offenders = []
    for path in files:
        if path == THIS_FILE or not is_text_file(path):
            continue
        for line_no, line in enumerate(read_text(path).splitlines(), 1):
            lowered = line.lower()
            for needle in OUTSIDE_REFERENCES:
                if needle in lowered:
                    offenders.append(f'{path}:{line_no}: mentions {needle!r}')
    assert not offenders, f'{len(offenders)} references to material outside the repository:\n' + \
        '\n'.join(offenders)


# ---------------------------------------------------------------- the checkers themselves catch what they should
def test_link_extraction_skips_code_and_external_targets():
    text = ('See [a](x.md), ![img](pics/p.png "title") and [b](<y.md#sec>).\n'
            '`[not](code.md)` and [web](https://example.org) and [here](#anchor).\n'
            '```\n[fenced](nope.md)\n```\n')
    targets = markdown_link_targets(text)
    assert targets == ['x.md', 'pics/p.png', 'y.md#sec', 'https://example.org', '#anchor']
    assert [t for t in targets if is_local_target(t)] == ['x.md', 'pics/p.png', 'y.md#sec']


def test_broken_links_and_citations_are_reported(tmp_path, monkeypatch):
    methods = tmp_path / 'docs' / 'methods'
    methods.mkdir(parents=True)
    (methods / 'page.md').write_text('[ok](other.md) [gone](missing.md) [up](../../top.md#x)\n')
    (methods / 'other.md').write_text('# Other\n## 3. Section\n### 3.1 Part\n')
    (tmp_path / 'top.md').write_text('docs/methods/other.md §3.1, docs/methods/other.md §4. docs/methods/none.md\n')
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    assert broken_links(['docs/methods/page.md', 'top.md']) == ['docs/methods/page.md: [..](missing.md)']
    assert broken_citations(['top.md']) == ['top.md: docs/methods/none.md does not exist',
                                            'top.md: docs/methods/other.md §4 has no heading numbered 4']
    (methods / 'cites.md').write_text('other.md §3 and other.md §3.2 and gone.md §1\n')
    (tmp_path / 'code.py').write_text('# other.md §3, docs/methods/other.md §3\n')
    assert unresolved_bare_citations(['docs/methods/cites.md', 'code.py']) == [
        'docs/methods/cites.md: gone.md §1: no page docs/methods/gone.md',
        'docs/methods/cites.md: other.md §3.2 has no heading numbered 3.2',
        'code.py: other.md §3 should be cited as docs/methods/other.md §3']


def test_resolve_link_is_relative_to_the_linking_file():
    assert resolve_link('docs/methods/logit.md', '../../train.py#L1') == os.path.join(ROOT, 'train.py')
    assert resolve_link('README.md', 'docs/methods/README.md') == os.path.join(ROOT, 'docs', 'methods', 'README.md')
    assert resolve_link('docs/methods/logit.md', 'ufd.md') == os.path.join(ROOT, 'docs', 'methods', 'ufd.md')


def test_heading_numbers_and_citation_patterns():
    page = '# Title\n## 1. KD\ntext 2. not a heading\n### 4.2 Closed form\n## 10. Decisions\n#### 10.1 Teacher\n'
    assert heading_numbers(page) == {'1', '4.2', '10', '10.1'}
    line = 'see docs/methods/ufd.md §4.2, docs/methods/results.md §1.2. and ../docs/x.md or docs/a.png.'
    assert DOCS_CITATION.findall(line) == ['docs/methods/ufd.md', 'docs/methods/results.md', 'docs/a.png']
    assert SECTION_CITATION.findall(line) == [('docs/methods/ufd.md', '4.2'), ('docs/methods/results.md', '1.2')]
