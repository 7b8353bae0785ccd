package benchreport

import (
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

func TestChart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.png")
	panels := []Panel{
		{Title: "req/s (higher is better)", Unit: "req/s", Bars: []Bar{
			{Label: "haconnect", Value: 20000, Kind: Haconnect, Note: "(0.50x consul)"},
			{Label: "consul", Value: 40000, Kind: Consul},
			{Label: "a label far too long to fit in the label column of the chart, cut", Value: 0, Kind: Ceiling},
		}},
		{Title: "CPU/request (lower is better)", Unit: "us", Format: "%.1f", Bars: []Bar{
			{Group: "100 B x 32", Label: "haconnect", Value: 40, Kind: Haconnect},
			{Group: "100 B x 32", Label: "consul", Value: 20, Kind: Consul},
			{Group: "16 KiB x 512", Label: "haconnect", Value: 140, Kind: Haconnect},
			{Group: "16 KiB x 512", Label: "off", Value: -3, Kind: Variant},
		}},
	}
	if err := Chart(path, "title", panels); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	// title, legend, 2 panels (title + gap), 3 + 4 bars and 2 group rows
	want := titleH + legendH + 2*(panelTitleHeight+panelGap) + 9*rowH + 10
	if b := img.Bounds(); b.Dx() != width || b.Dy() != want {
		t.Errorf("size %v, want %dx%d", b, width, want)
	}
	// The largest bar of the first panel is drawn in Consul's colour.
	r, g, bl, _ := img.At(left+10, titleH+legendH+panelGap+panelTitleHeight+rowH+rowH/2).RGBA()
	if c := kindColor[Consul]; uint8(r>>8) != c.R || uint8(g>>8) != c.G || uint8(bl>>8) != c.B {
		t.Errorf("bar colour %x %x %x", r>>8, g>>8, bl>>8)
	}
}
