"""The two kinds of failure: job-level problems (stop before work) and per-image problems (become rows)."""


class BatchsegError(Exception):
    """A job-level problem (bad config, unreadable manifest, unwritable output).

    Raised before any work starts; the CLI prints it as one line and exits non-zero.
    """


class ImageError(Exception):
    """A per-image problem. It never stops the job: the image becomes an ``error`` row.

    ``kind`` is a short stable code (``not_found``, ``permission_denied``, ``read_error``,
    ``empty_file``, ``not_an_image``, ``corrupt_image``, ``too_large``, ``inference_error``);
    the row's ``error`` column reads ``"<kind>: <message>"``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
