package haproxy

import (
	"reflect"
	"testing"
)

func TestParseServerStats(t *testing.T) {
	// A `show stat -1 4 -1` answer of HAProxy 2.6.12, cut to the columns
	// read and a few around them (the parse goes by the header's names).
	out := "# pxname,svname,qcur,wretr,status,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,\n" +
		"upstream_api,s1,0,0,UP,0,120,1,2,0,0,\n" +
		"upstream_api,s2,0,17,DOWN 2/30,0,0,0,0,3,0,\n\n"
	got, err := parseServerStats(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []ServerStat{
		{Backend: "upstream_api", Server: "s1", Status: "UP", ResponsesOK: 123},
		{Backend: "upstream_api", Server: "s2", Status: "DOWN 2/30", Retries: 17, Responses5xx: 3},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	if _, err := parseServerStats("Unknown command.\n"); err == nil {
		t.Fatal("an error answer was parsed")
	}
}
