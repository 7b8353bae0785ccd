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
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18080", "address to serve on")
	name := flag.String("name", "api", "service name to report")
	upstream := flag.String("upstream", "", "URL of an upstream to call on each request (through the local sidecar)")
	flag.Parse()
	client := &http.Client{Timeout: 5 * time.Second}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s; caller (x-haconnect-source): %q\n", *name, r.Header.Get("X-Haconnect-Source"))
		if *upstream == "" {
			return
		}
		resp, err := client.Get(*upstream)
		if err != nil {
			w.WriteHeader(http.StatusBadGateway)
			fmt.Fprintf(w, "upstream %s: %v\n", *upstream, err)
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != http.StatusOK {
			w.WriteHeader(http.StatusBadGateway)
		}
		fmt.Fprintf(w, "upstream answered %d: %s\n", resp.StatusCode, strings.TrimSpace(string(body)))
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	srv := &http.Server{Addr: *listen, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
