"""Griffe extension: the reST bits of rollfast's docstrings, as the site's Markdown.

Docstrings follow the Optax style, whose maths is reST (``.. math::`` blocks and
``:math:`x``` roles). mkdocstrings renders docstrings as Markdown, so before
rendering this extension rewrites, in every docstring it loads:

* a ``.. math::`` block (the directive and the lines indented under it) into a
  ``$$ … $$`` block at the directive's indentation, blank lines dropped, which
  ``pymdownx.arithmatex`` hands to MathJax; a block with line breaks (``\\``) is
  wrapped in ``aligned`` (if it has ``&``) or ``gathered``, as Sphinx does, since
  MathJax ignores a bare ``\\`` in display maths;
* ``:math:`x``` into ``$x$``;
* cross-reference roles (``:func:`f```, ``:class:`C```, ...) into code spans;
* a paragraph ending in ``::`` (a reST literal block follows) into one ending in ``:``;
* a doctest (a ``>>>`` line, its continuations and its output, up to a blank line)
  into a fenced ``pycon`` block, so that ``p["w"]`` is not read as a Markdown link.
"""

from __future__ import annotations

import re

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*$")


def rest_to_markdown(text: str) -> str:
    """Rewrite the reST constructs listed in the module docstring.

    >>> print(rest_to_markdown("Step :math:`x`::\\n\\n.. math::\\n    a = b \\\\\\\\\\n\\n    c\\nEnd"))
    Step $x$:
    <BLANKLINE>
    $$
    \\begin{gathered}
    a = b \\\\
    c
    \\end{gathered}
    $$
    <BLANKLINE>
    End
    >>> rest_to_markdown('Text.\\n  >>> p["w"]\\n  1').splitlines()
    ['Text.', '', '  ```pycon', '  >>> p["w"]', '  1', '  ```']
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        directive = _DIRECTIVE.match(lines[i])
        if directive is not None:
            pad = directive.group(1)
            i, body = _math_body(lines, i + 1, len(pad))
            out += _block(out, pad + "$$", [pad + line for line in _environment(body)], pad + "$$")
        elif lines[i].lstrip().startswith(">>>"):
            pad = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            out += _block(out, pad + "```pycon", lines[i:end], pad + "```")
            i = end
        else:
            out.append(lines[i])
            i += 1
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _XREF_ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return re.sub(r"(?<=[^\s:]):: *$", ":", text, flags=re.MULTILINE)


def _block(before: list[str], opening: str, body: list[str], closing: str) -> list[str]:
    """``body`` between ``opening`` and ``closing``, set off by blank lines."""
    lead = [""] if before and before[-1].strip() else []
    return [*lead, opening, *body, closing, ""]


def _environment(body: list[str]) -> list[str]:
    """The non-blank lines of a math block, in ``aligned``/``gathered`` if they break lines."""
    body = [line for line in body if line.strip()]
    text = "\n".join(body)
    if "\\\\" not in text or "\\begin{" in text:
        return body
    env = "aligned" if "&" in text else "gathered"
    return [f"\\begin{{{env}}}", *body, f"\\end{{{env}}}"]


def _math_body(lines: list[str], start: int, indent: int) -> tuple[int, list[str]]:
    """The lines indented deeper than ``indent`` from ``start``, dedented; the next index."""
    end = start
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    body = lines[start:end]
    depth = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
    return end, [b[depth:] for b in body]


class RestMath(griffe.Extension):
    """Apply :func:`rest_to_markdown` to every docstring griffe loads."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        """The top-level package (``on_object`` only sees its members)."""
        self.on_object(obj=pkg)

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        """Every module, class, function and attribute below a package."""
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)
