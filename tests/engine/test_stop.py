from deepserve.engine.stop import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out += text
        if hit is not None:
            return out, hit
    return out + matcher.flush(), None


def test_no_stop_strings_passes_text_through():
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == ("ab", None)


def test_stop_inside_one_piece_cuts_before_it():
    assert feed_all(StopStringMatcher(["END"]), ["hello END world"]) == ("hello ", "END")


def test_stop_split_across_pieces_is_caught_and_never_emitted():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", None)  # "ST" held back: could be the start of STOP
    assert matcher.feed("O") == ("", None)
    assert matcher.feed("P and more") == ("", "STOP")


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ("", None)
    assert matcher.feed("ay") == ("STay", None)


def test_held_text_is_flushed_at_the_end():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("end ST") == ("end ", None)
    assert matcher.flush() == "ST"


def test_earliest_of_several_stop_strings_wins():
    assert feed_all(StopStringMatcher(["world", "lo w"]), ["hello world"]) == ("hel", "lo w")


def test_stop_split_at_every_position():
    text = "The quick brown fox"
    for cut in range(1, len(text)):
        assert feed_all(StopStringMatcher(["brown"]), [text[:cut], text[cut:]]) == ("The quick ", "brown")


def _feed(stops, pieces, seconds=0.0):
    kept = []
    for piece in pieces:
        text, stop = stops.feed(piece, seconds)
        kept.append(text)
        if stop:
            return "".join(kept), True
    return "".join(kept), False


def test_n_indent_ends_at_the_first_line_indented_less_in_the_piece_where_it_shows():
    from deepserve.engine.stop import EditorStops

    assert _feed(EditorStops(n_indent=4), ["x = 1", "\n", "    ", "y = 2\n", "  ", "z", " = 3"]) == (
        "x = 1\n    y = 2\n  ", True)  # "z" is on a line indented 2 < 4
    assert _feed(EditorStops(n_indent=4), ["if x:\n", "    a\n", "\n", "    b"]) == (
        "if x:\n    a\n", True)  # a blank line ends it too, as llama-server
    assert _feed(EditorStops(n_indent=4), ["def f():\n    return 1\nprint", "(f())"]) == (
        "def f():\n    return 1\n", True)  # several lines in one piece
    assert _feed(EditorStops(n_indent=4), ["no new line at all ", "still the first line"]) == (
        "no new line at all still the first line", False)


def test_t_max_predict_ms_ends_at_a_new_line_once_past_the_time():
    from deepserve.engine.stop import EditorStops

    timed = EditorStops(t_max_predict_ms=100)
    assert timed.feed("a\n", 0.05) == ("a\n", False) and timed.feed("b", 0.2) == ("b", False)
    assert timed.feed("\n", 0.2) == ("\n", True) and timed.stopped
