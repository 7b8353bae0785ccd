// Command haconnect-demo-app is the demo's destination service: an HTTP app
// that says who called it, as told by its haconnect sidecar.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18080", "address to serve on")
	name := flag.String("name", "api", "service name to report")
	flag.Parse()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s; caller (x-haconnect-source): %q\n", *name, r.Header.Get("X-Haconnect-Source"))
	})
	srv := &http.Server{Addr: *listen, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
