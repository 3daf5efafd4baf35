from scrapy_speedup.demo.site import main

main()
