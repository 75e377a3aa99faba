"""Which filesystem the runtime dir is on (daemon.filesystem_of), from mountinfo text."""

from __future__ import annotations

from pathlib import Path

import pytest

from osk_daemon.daemon import filesystem_of

pytestmark = pytest.mark.timeout(10)

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 22 0:21 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:22 / /run/osk rw - tmpfs tmpfs rw
27 22 0:23 / /srv/my\\040dir rw - xfs /dev/vdb rw
28 22 0:24 / /running rw - ext4 /dev/vdc rw
garbage line without a separator
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/run/osk/output", "tmpfs"),  # the longest mount point above it wins
        ("/run", "tmpfs"),
        ("/running/osk", "ext4"),  # a name that starts like /run is not under it
        ("/srv/my dir/osk", "xfs"),  # mountinfo escapes a space as \\040
        ("/tmp/osk-t-1/run", "ext4"),
    ],
)
def test_the_deepest_mount_above_a_path_names_its_filesystem(path: str, kind: str) -> None:
    assert filesystem_of(Path(path), MOUNTINFO) == kind


def test_no_mount_above_a_path_is_none() -> None:
    assert filesystem_of(Path("/x"), "garbage\n") is None
