#!/usr/bin/env python3
"""Tests of tools/module_cycles.py on small made-up crates.

Run: python3 tools/module_cycles_test.py
"""

import contextlib
import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import module_cycles  # noqa: E402


def check(files):
    """(exit status, output) of the tool on a crate made of `files`."""
    with tempfile.TemporaryDirectory() as src:
        for path, text in files.items():
            full = os.path.join(src, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = module_cycles.main([src])
        return status, out.getvalue()


class ModuleCycles(unittest.TestCase):
    def test_two_modules_using_each_other_are_a_circle(self):
        status, out = check({
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a.rs": "use crate::b::B;\npub struct A;\n",
            "b.rs": "pub struct B(crate::a::A);\n",
        })
        self.assertEqual(status, 1, out)
        self.assertIn("circle among the children of crate: a, b", out)
        self.assertIn("a -> b  (a uses b at", out)

    def test_a_circle_through_a_child_counts_for_its_parent(self):
        status, out = check({
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a/mod.rs": "pub mod inner;\n",
            "a/inner.rs": "use crate::b::{self, B};\n",
            "b.rs": "use crate::a::inner;\npub struct B;\n",
        })
        self.assertEqual(status, 1, out)

    def test_a_parent_and_its_children_may_use_each_other(self):
        status, out = check({
            "lib.rs": "pub mod a;\n",
            "a/mod.rs": "mod x;\nuse x::X;\npub struct P;\n",
            "a/x.rs": "use super::P;\npub struct X;\n",
        })
        self.assertEqual(status, 0, out)

    def test_siblings_in_a_directory_may_not(self):
        status, out = check({
            "lib.rs": "pub mod a;\n",
            "a/mod.rs": "mod x;\nmod y;\n",
            "a/x.rs": "use super::y::Y;\npub struct X;\n",
            "a/y.rs": "use super::x::X;\npub struct Y;\n",
        })
        self.assertEqual(status, 1, out)
        self.assertIn("circle among the children of a: a::x, a::y", out)

    def test_comments_doc_links_and_strings_are_not_uses(self):
        status, out = check({
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a.rs": "use crate::b::B;\n",
            "b.rs": (
                "/// See [`A`](crate::a::A).\n"
                "// crate::a::A\n"
                "/* crate::a::A */\n"
                "const S: &str = \"crate::a::A\";\n"
                "const R: &str = r#\"crate::a::A\"#;\n"
                "const C: char = '\"';\n"
                "pub struct B;\n"
            ),
        })
        self.assertEqual(status, 0, out)

    def test_super_in_an_inline_module_is_resolved_from_where_it_sits(self):
        # In a::x's `mod tests`, `super::y` is a::x's own inline `y`, not the
        # sibling file a::y (which would make a circle x <-> y).
        status, out = check({
            "lib.rs": "pub mod a;\n",
            "a/mod.rs": "mod x;\nmod y;\n",
            "a/x.rs": (
                "pub struct X;\n"
                "pub mod y { pub struct Y; }\n"
                "#[cfg(test)]\nmod tests {\n    use super::y::Y;\n}\n"
            ),
            "a/y.rs": "use super::x::X;\n",
        })
        self.assertEqual(status, 0, out)

if __name__ == "__main__":
    unittest.main()
