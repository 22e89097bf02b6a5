"""Multipart forms whose text fields keep bytes in another encoding visible.

Starlette decodes a text field that is not UTF-8 as latin-1, so a prompt saved in GB18030 or UTF-16
(``curl -F "prompt=<prompt.txt"``) reaches the endpoint as plausible mojibake and would be drawn as such.
Which fields fell back cannot be told from the decoded text (``"café"`` is valid UTF-8 *and* latin-1), so
the bytes are checked while parsing: a field that does not decode in the request's charset (UTF-8 unless the
client names another) arrives with its stray bytes as lone surrogates (``\\udcb8``), as Python passes on a
command-line argument in another encoding, and :func:`taiyi.prompts.require_text` refuses it with the same
one-line 400 as a JSON ``"\\ud800"``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response


class _TextKeepingParser(MultiPartParser):
    """Starlette's parser, except that a text field that does not decode keeps its bytes as surrogates."""

    def on_part_end(self) -> None:
        part = self._current_part
        super().on_part_end()
        if part.file is None:
            data = bytes(part.data)
            try:
                data.decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                self.items[-1] = (part.field_name, data.decode("utf-8", "surrogateescape"))


class _TextKeepingRequest(Request):
    async def _get_form(
        self, *, max_files: int | float = 1000, max_fields: int | float = 1000, max_part_size: int = 1024 * 1024
    ) -> FormData:
        content_type = self.headers.get("content-type", "").partition(";")[0].strip().lower()
        if self._form is None and content_type == "multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _TextKeepingParser(
                        self.headers, stream, max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(status_code=400, detail=exc.message) from None
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class TextKeepingRoute(APIRoute):
    """An APIRoute whose endpoints read multipart forms with :class:`_TextKeepingParser`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_TextKeepingRequest(request.scope, request.receive))

        return route_handler
