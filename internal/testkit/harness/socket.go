package harness

import (
	"net"
	"testing"
	"time"
)

// WaitSocket waits until a unix socket at path accepts connections.
func WaitSocket(t testing.TB, path string, timeout time.Duration) {
	t.Helper()
	WaitFor(t, timeout, path+" to listen", func() bool {
		c, err := net.DialTimeout("unix", path, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}
