"""Creates a blob container on Azurite (Microsoft's Azure Storage emulator) with its
well-known development account, signed with Shared Key by hand (the standard library
only), so the Azure remote-cache test needs no Azure SDK.

    azurite.py ENDPOINT CONTAINER
"""
import base64
import hashlib
import hmac
import sys
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def create_container(endpoint, name):
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    # Verb, then eleven standard headers (all empty for this request), then ours.
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    mac = hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"
    request = urllib.request.Request(f"{endpoint}/{ACCOUNT}/{name}?restype=container", method="PUT",
                                     headers=headers)
    urllib.request.urlopen(request).close()


if __name__ == "__main__":
    create_container(sys.argv[1], sys.argv[2])
