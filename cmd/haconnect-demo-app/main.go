// Command haconnect-demo-app is the demo services' app: it says who it is
// and who called it (as its haconnect sidecar tells it), and with -upstream
// it also calls another service through its sidecar's upstream listener
// and reports the answer.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18080", "address to serve on")
	name := flag.String("name", "api", "service name to report")
	upstream := flag.String("upstream", "", "URL of an upstream to call on each request (through the local sidecar)")
	flag.Parse()
	client := &http.Client{Timeout: 5 * time.Second}
	var served atomic.Int64
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		var b strings.Builder
		fmt.Fprintf(&b, "hello from %s (request #%d); caller (x-haconnect-source): %q\n",
			*name, served.Add(1), r.Header.Get("X-Haconnect-Source"))
		status := http.StatusOK
		if *upstream != "" {
			resp, err := client.Get(*upstream)
			if err != nil {
				status = http.StatusBadGateway
				fmt.Fprintf(&b, "upstream %s: %v\n", *upstream, err)
			} else {
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					status = http.StatusBadGateway
				}
				fmt.Fprintf(&b, "upstream answered %d: %s\n", resp.StatusCode, strings.TrimSpace(string(body)))
			}
		}
		w.WriteHeader(status)
		io.WriteString(w, b.String())
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	srv := &http.Server{Addr: *listen, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
