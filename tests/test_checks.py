"""checks.py: the small helpers every level may use."""

from lightning_lobs.checks import add_note


def test_add_note_uses_the_exception_method_where_it_exists_and_notes_otherwise():
    """Python 3.10 has no BaseException.add_note: the note goes to __notes__ instead of raising AttributeError."""
    error = ValueError("the user's own")
    add_note(error, "first")
    add_note(error, "second")
    assert error.__notes__ == ["first", "second"] and error.args == ("the user's own",)

    class NoAddNote:  # what an exception looks like on 3.10
        pass

    old = NoAddNote()
    add_note(old, "first")  # type: ignore[arg-type]
    add_note(old, "second")  # type: ignore[arg-type]
    assert old.__notes__ == ["first", "second"]
