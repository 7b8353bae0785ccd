package haproxy

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// sharedDirs maps a working directory HAProxy reads as another user than
// haconnect's to HAProxy's group (see ShareDir).
var sharedDirs sync.Map // clean absolute path -> gid

// ShareDir readies dir for an HAProxy that runs as another, unprivileged
// user whose group is gid (plugin/docker, when haconnect runs as root):
//
//   - dir stays haconnect's, with HAProxy's group: rwx for the group, so
//     that HAProxy can create its admin and master sockets; sticky, so that
//     it can neither remove nor replace haconnect's files; setgid, so that
//     new files get the group; nothing for others.
//   - haconnect's files in it become readable by the group (0640), the
//     leaf's private key included, and haconnect's sockets (the embedded
//     SPOA's) connectable by it (0660). Entries of other owners (HAProxy's
//     own sockets) are left as they are.
//   - from then on, WriteFileAtomic writes files there group-readable.
//
// The group is HAProxy's alone, so the key is readable by HAProxy's user
// and by haconnect, no one else.
func ShareDir(dir string, gid int) error {
	dir = filepath.Clean(dir)
	if err := os.Chown(dir, os.Getuid(), gid); err != nil {
		return fmt.Errorf("working directory %s for haproxy's group %d: %w", dir, gid, err)
	}
	if err := os.Chmod(dir, os.ModeSticky|os.ModeSetgid|0o770); err != nil {
		return fmt.Errorf("working directory %s: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := shareEntry(filepath.Join(dir, e.Name()), gid); err != nil {
			return err
		}
	}
	sharedDirs.Store(dir, gid)
	return nil
}

// shareEntry gives gid read access to one of haconnect's files, or connect
// access to one of its sockets.
func shareEntry(path string, gid int) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || int(st.Uid) != os.Getuid() {
		return nil
	}
	switch {
	case fi.Mode().IsRegular():
		// Through a descriptor opened without following links, so that
		// the entry checked is the one changed.
		f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := f.Chown(-1, gid); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return f.Chmod(0o640)
	case fi.Mode()&os.ModeSocket != 0:
		if err := os.Lchown(path, -1, gid); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		// The directory is sticky and the socket ours: nobody else can
		// have swapped it for a link since the Lstat above.
		return os.Chmod(path, 0o660)
	}
	return nil
}

// sharedGroup reports HAProxy's group if dir was shared with ShareDir.
func sharedGroup(dir string) (int, bool) {
	gid, ok := sharedDirs.Load(filepath.Clean(dir))
	if !ok {
		return 0, false
	}
	return gid.(int), true
}
