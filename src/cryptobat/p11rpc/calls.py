"""The p11-kit RPC call table: call id -> (name, request signature, response signature).

Signature letters: ``y`` byte, ``u`` ulong (8 bytes), ``v`` version, ``s`` space-padded
string, ``z`` string, ``ay``/``au``/``aA`` byte/ulong/attribute arrays, ``fy``/``fu``/``fA``
receive-buffer sizes, ``M`` mechanism, ``P`` mechanism parameter.  Ids 66.. exist only
from protocol version 1 (p11-kit 0.25), ``C_DeriveKey2`` only from version 2 (0.25.6).
"""
from __future__ import annotations

from typing import NamedTuple


class Call(NamedTuple):
    id: int
    name: str
    request: str
    response: str
    min_version: int = 0


_TABLE = [
    ("ERROR", "", "u"),
    ("C_Initialize", "ayyay", ""),
    ("C_Finalize", "", ""),
    ("C_GetInfo", "", "vsusv"),
    ("C_GetSlotList", "yfu", "au"),
    ("C_GetSlotInfo", "u", "ssuvv"),
    ("C_GetTokenInfo", "u", "ssssuuuuuuuuuuuvvs"),
    ("C_GetMechanismList", "ufu", "au"),
    ("C_GetMechanismInfo", "uu", "uuu"),
    ("C_InitToken", "uayz", ""),
    ("C_OpenSession", "uu", "u"),
    ("C_CloseSession", "u", ""),
    ("C_CloseAllSessions", "u", ""),
    ("C_GetSessionInfo", "u", "uuuu"),
    ("C_InitPIN", "uay", ""),
    ("C_SetPIN", "uayay", ""),
    ("C_GetOperationState", "ufy", "ay"),
    ("C_SetOperationState", "uayuu", ""),
    ("C_Login", "uuay", ""),
    ("C_Logout", "u", ""),
    ("C_CreateObject", "uaA", "u"),
    ("C_CopyObject", "uuaA", "u"),
    ("C_DestroyObject", "uu", ""),
    ("C_GetObjectSize", "uu", "u"),
    ("C_GetAttributeValue", "uufA", "aAu"),
    ("C_SetAttributeValue", "uuaA", ""),
    ("C_FindObjectsInit", "uaA", ""),
    ("C_FindObjects", "ufu", "au"),
    ("C_FindObjectsFinal", "u", ""),
    ("C_EncryptInit", "uMu", ""),
    ("C_Encrypt", "uayfy", "ay"),
    ("C_EncryptUpdate", "uayfy", "ay"),
    ("C_EncryptFinal", "ufy", "ay"),
    ("C_DecryptInit", "uMu", ""),
    ("C_Decrypt", "uayfy", "ay"),
    ("C_DecryptUpdate", "uayfy", "ay"),
    ("C_DecryptFinal", "ufy", "ay"),
    ("C_DigestInit", "uM", ""),
    ("C_Digest", "uayfy", "ay"),
    ("C_DigestUpdate", "uay", ""),
    ("C_DigestKey", "uu", ""),
    ("C_DigestFinal", "ufy", "ay"),
    ("C_SignInit", "uMu", ""),
    ("C_Sign", "uayfy", "ay"),
    ("C_SignUpdate", "uay", ""),
    ("C_SignFinal", "ufy", "ay"),
    ("C_SignRecoverInit", "uMu", ""),
    ("C_SignRecover", "uayfy", "ay"),
    ("C_VerifyInit", "uMu", ""),
    ("C_Verify", "uayay", ""),
    ("C_VerifyUpdate", "uay", ""),
    ("C_VerifyFinal", "uay", ""),
    ("C_VerifyRecoverInit", "uMu", ""),
    ("C_VerifyRecover", "uayfy", "ay"),
    ("C_DigestEncryptUpdate", "uayfy", "ay"),
    ("C_DecryptDigestUpdate", "uayfy", "ay"),
    ("C_SignEncryptUpdate", "uayfy", "ay"),
    ("C_DecryptVerifyUpdate", "uayfy", "ay"),
    ("C_GenerateKey", "uMaA", "u"),
    ("C_GenerateKeyPair", "uMaAaA", "uu"),
    ("C_WrapKey", "uMuufy", "ay"),
    ("C_UnwrapKey", "uMuayaA", "u"),
    ("C_DeriveKey", "uMuaA", "u"),
    ("C_SeedRandom", "uay", ""),
    ("C_GenerateRandom", "ufy", "ay"),
    ("C_WaitForSlotEvent", "u", "u"),
    # PKCS#11 3.0, protocol version 1
    ("C_LoginUser", "uuayay", ""),
    ("C_SessionCancel", "uu", ""),
    ("C_MessageEncryptInit", "uMu", ""),
    ("C_EncryptMessage", "uayayayfy", "ay"),
    ("C_EncryptMessageBegin", "uayay", ""),
    ("C_EncryptMessageNext", "uayayfyu", "ay"),
    ("C_MessageEncryptFinal", "u", ""),
    ("C_MessageDecryptInit", "uMu", ""),
    ("C_DecryptMessage", "uayayayfy", "ay"),
    ("C_DecryptMessageBegin", "uayay", ""),
    ("C_DecryptMessageNext", "uayayfyu", "ay"),
    ("C_MessageDecryptFinal", "u", ""),
    ("C_MessageSignInit", "uMu", ""),
    ("C_SignMessage", "uayayfy", "ay"),
    ("C_SignMessageBegin", "uay", ""),
    ("C_SignMessageNext", "uayayyfy", "ay"),
    ("C_MessageSignFinal", "u", ""),
    ("C_MessageVerifyInit", "uMu", ""),
    ("C_VerifyMessage", "uayayay", ""),
    ("C_VerifyMessageBegin", "uay", ""),
    ("C_VerifyMessageNext", "uayayay", ""),
    ("C_MessageVerifyFinal", "u", ""),
    ("C_InitToken2", "uays", ""),
    # protocol version 2
    ("C_DeriveKey2", "uMuaA", "uPu"),
]

LAST_V0 = 65  # C_WaitForSlotEvent
CALLS: tuple[Call, ...] = tuple(
    Call(i, name, req, resp, 0 if i <= LAST_V0 else (2 if name == "C_DeriveKey2" else 1))
    for i, (name, req, resp) in enumerate(_TABLE)
)
BY_NAME: dict[str, Call] = {c.name: c for c in CALLS}
MAX_VERSION = 2


def lookup(call_id: int, version: int) -> Call | None:
    """The request call for ``call_id`` if it exists in protocol ``version``, else None."""
    if 0 < call_id < len(CALLS) and CALLS[call_id].min_version <= version:
        return CALLS[call_id]
    return None
