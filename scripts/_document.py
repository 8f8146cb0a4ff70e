"""A small document model for reports: headings, paragraphs, lists, tables, figures and
code, rendered both as Markdown (figures linked) and as one self-contained HTML file
(figures embedded as base64 PNG). The report is built from blocks, not parsed from
Markdown, so both renderings say the same thing.

Inline text may use **bold**, `code` and [label](target); everything else is escaped
in HTML.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field

_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)")

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1000px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
code { background: #f5f5f5; padding: 0 .2em; }
pre { background: #f5f5f5; padding: .6em; overflow-x: auto; }
.bad { color: #b00; font-weight: bold; }
"""


def _inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"<strong>{html.escape(m.group(1))}</strong>")
        elif m.group(2) is not None:
            out.append(f"<code>{html.escape(m.group(2))}</code>")
        else:
            out.append(f'<a href="{html.escape(m.group(4), quote=True)}">{html.escape(m.group(3))}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _numeric(text) -> bool:
    return bool(re.fullmatch(r"[-+−]?[\d.,]+(e[-+]?\d+)?( ± [\d.,]+(e[-+]?\d+)?)?%?", str(text).strip()))


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, headers: list[str], rows: list[list], caption: str = "") -> None:
        self.blocks.append(("table", list(headers), [list(r) for r in rows], caption))

    def figure(self, path: str, caption: str) -> None:
        """``path`` relative to the report's directory."""
        self.blocks.append(("figure", path, caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def extend(self, other: "Document") -> None:
        self.blocks.extend(other.blocks)

    # ------------------------------------------------------------------ Markdown

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for b in self.blocks:
            kind = b[0]
            if kind == "heading":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif kind == "para":
                lines += [b[1], ""]
            elif kind == "bullets":
                lines += [f"- {item}" for item in b[1]] + [""]
            elif kind == "table":
                _, headers, rows, caption = b
                if caption:
                    lines += [caption, ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join("---:" if rows and all(_numeric(r[i]) for r in rows) else "---"
                                            for i in range(len(headers))) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
            elif kind == "figure":  # brackets in the alternative text escaped (a caption may say loc[0])
                alt = b[2].replace("[", "\\[").replace("]", "\\]")
                lines += [f"![{alt}]({b[1]})", "", f"*{b[2]}*", ""]
            elif kind == "code":
                lines += ["```", b[1].rstrip("\n"), "```", ""]
        return "\n".join(lines)

    # ------------------------------------------------------------------ HTML

    def to_html(self, base_dir: str) -> str:
        """One self-contained page: every figure read from ``base_dir`` and embedded."""
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{html.escape(self.title)}</title>", f"<style>{CSS}</style></head><body>",
               f"<h1>{_inline_html(self.title)}</h1>"]
        for b in self.blocks:
            kind = b[0]
            if kind == "heading":
                out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
            elif kind == "para":
                out.append(f"<p>{_inline_html(b[1])}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif kind == "table":
                _, headers, rows, caption = b
                cap = f"<caption>{_inline_html(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in headers)
                body = "".join("<tr>" + "".join(
                    f'<td class="num">{_inline_html(str(c))}</td>' if _numeric(c) else f"<td>{_inline_html(str(c))}</td>"
                    for c in r) + "</tr>" for r in rows)
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "figure":
                with open(os.path.join(base_dir, b[1]), "rb") as f:
                    data = base64.b64encode(f.read()).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2], quote=True)}">'
                           f"<figcaption>{_inline_html(b[2])}</figcaption></figure>")
            elif kind == "code":
                out.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
        out.append("</body></html>")
        return "\n".join(out)
