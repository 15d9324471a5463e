"""Checks an HTML report: tags balanced and nested, every picture a PNG data URI, nothing external."""
import base64
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Checker(HTMLParser):
    """Tags balanced and properly nested; every src/href collected."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.sources, self.links = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if "href" in attrs:
            self.links.append(attrs["href"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <img/>: opens and closes itself
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_html(text):
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert checker.sources and all(s.startswith("data:image/png;base64,") for s in checker.sources)
    for source in checker.sources:
        assert base64.b64decode(source.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not checker.links  # nothing to fetch, nothing to follow
    root = ElementTree.fromstring(text.removeprefix("<!DOCTYPE html>"))  # also well-formed XML
    assert root.tag == "html" and [img.get("src") for img in root.iter("img")] == checker.sources
    return checker
