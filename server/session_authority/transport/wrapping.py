"""``WrappingInterceptor`` and ``Handler``, importable from their former place:
the machinery lives in ``session_authority.rpc``, the one copy the transport
and observability share."""

from session_authority.rpc import Handler, WrappingInterceptor

__all__ = ["Handler", "WrappingInterceptor"]
