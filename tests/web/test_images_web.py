"""Images in the web app: the editor's images route (what a paste, a drop or "Add image…" posts),
the cell showing them inline, a save dropping the images the text no longer shows, and the page's
security headers letting data: images through."""
from __future__ import annotations

import base64

from imagefiles import PNG, png
from webutil import HX, Tags


def test_images_posted_from_the_editor_are_stored_and_shown(client, db):
    d = db.create("Web pics")
    n = db.add(d.id, "note", "Before.")
    r = client.post(f"/d/{d.id}/m/{n.id}/images", headers=HX, data={"version": str(n.version)},
                    files=[("image", ("Screenshot 2026-12-06.png", PNG, "image/png")),
                           ("image", ("image.png", png(rgb=b"\x00\xff\x00"), "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["names"] == ["Screenshot-2026-12-06.png", "image.png"]
    assert body["refs"] == ["![Screenshot-2026-12-06.png](attachment:Screenshot-2026-12-06.png)",
                            "![image.png](attachment:image.png)"]
    stored = db.message(d.id, n.id)
    assert body["version"] == stored.version == n.version + 1
    assert stored.source == "Before." and set(stored.attachments) == set(body["names"])
    assert stored.attachments["image.png"] == {
        "image/png": base64.b64encode(png(rgb=b"\x00\xff\x00")).decode()}

    # the page puts one reference at the cursor and saves: the cell shows it, the other is dropped
    src = "Before.\n" + body["refs"][1]
    r = client.post(f"/d/{d.id}/m/{n.id}/save", headers=HX,
                    data={"source": src, "version": str(body["version"])})
    assert r.status_code == 200
    imgs = Tags(r.text).find("img")
    assert [i["src"] for i in imgs] == [
        "data:image/png;base64," + base64.b64encode(png(rgb=b"\x00\xff\x00")).decode()]
    assert list(db.message(d.id, n.id).attachments) == ["image.png"]
    # the editor of a note offers the file picker (no name: the cell's other posts never carry it)
    page = client.get(f"/d/{d.id}").text
    picks = Tags(page).find("input", type="file", **{"data-act": "image-file"})
    assert picks and picks[0].get("name") is None and "image/png" in picks[0]["accept"]
    assert "img-src 'self' data:" in client.get(f"/d/{d.id}").headers["content-security-policy"]


def test_what_is_not_an_image_or_is_stale_is_refused_and_nothing_changes(client, db):
    d = db.create("Web refusals")
    n = db.add(d.id, "prompt", "Q?")
    r = client.post(f"/d/{d.id}/m/{n.id}/images", headers=HX, data={"version": str(n.version)},
                    files=[("image", ("evil.png", b"<svg onload=alert(1)>", "image/png"))])
    assert r.status_code == 400
    assert "evil.png is not an image we can attach" in r.json()["error"]
    r = client.post(f"/d/{d.id}/m/{n.id}/images", headers=HX, data={"version": "99"},
                    files=[("image", ("a.png", PNG, "image/png"))])
    assert r.status_code == 409 and "Reload the cell" in r.json()["error"]
    c = db.add(d.id, "code", "1")
    r = client.post(f"/d/{d.id}/m/{c.id}/images", headers=HX, data={"version": str(c.version)},
                    files=[("image", ("a.png", PNG, "image/png"))])
    assert r.status_code == 400 and "not in a code message" in r.json()["error"]
    r = client.post(f"/d/{d.id}/m/{n.id}/images", headers=HX, data={"version": str(n.version)})
    assert r.status_code == 400 and r.json()["error"] == "no image came with the request"
    assert db.message(d.id, n.id) == n and db.message(d.id, c.id).attachments == {}
    # a cross-site post (no HX-Request header) never reaches the route
    r = client.post(f"/d/{d.id}/m/{n.id}/images", data={"version": str(n.version)},
                    files=[("image", ("a.png", PNG, "image/png"))])
    assert r.status_code == 403 and db.message(d.id, n.id) == n
