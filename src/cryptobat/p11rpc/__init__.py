"""p11-kit RPC server so the stock ``p11-kit-client.so`` can use Cryptobat as a PKCS#11 token."""
from .backend import Backend
from .codec import RpcError
from .server import Connection

__all__ = ["Backend", "Connection", "RpcError"]
